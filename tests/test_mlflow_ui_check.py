"""tools/mlflow_ui_check.py end to end: the smoke sweep opened in a real ``mlflow ui``
with headless Chromium (Debian's chromium + chromium-driver), as a reader would."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = {f"mlflow_{name}.png" for name in (
    "runs_table", "verdict_filter", "parent_run", "collapse_map", "compare_parallel_coordinates")}

pytestmark = [
    pytest.mark.timeout(1500),
    pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                       reason="needs apt-get install -y chromium chromium-driver"),
]


def _main():
    sys.path.insert(0, str(ROOT))
    pytest.importorskip("selenium")
    from tools.mlflow_ui_check import main

    return main


def test_names_shown_alike_are_found_with_the_runs_showing_them():
    sys.path.insert(0, str(ROOT))
    pytest.importorskip("selenium")
    from tools.mlflow_ui_pages import duplicate_names

    assert duplicate_names([("kappa=1/4 s1", "kappa=1/4 s1"), ("kappa=1/4 s0", "kappa=1/4 s0"),
                            ("baseline s0", "baseline s0")]) == {}
    # the names trials had before: the column cut them all alike
    old = [(f"search_kl_smoke/free_bits_bits={k},seed={s}", "search_kl_smo\u2026")
           for k in ("0.01562", "4") for s in (0, 1)]
    assert duplicate_names([*old, ("search_kl_smoke", "search_kl_smoke")]) == \
        {"search_kl_smo\u2026": sorted(name for name, _ in old)}
    # names unique in full are not enough: what counts is the text shown
    assert duplicate_names([("kappa=1/4 seed=0", "kappa=1/4 se\u2026"),
                            ("kappa=1/4 seed=1", "kappa=1/4 se\u2026"), ("baseline", "b")]) \
        == {"kappa=1/4 se\u2026": ["kappa=1/4 seed=0", "kappa=1/4 seed=1"]}
    # two runs of the same name count twice
    assert duplicate_names([("baseline s0", "baseline s0")] * 2) == \
        {"baseline s0": ["baseline s0", "baseline s0"]}


@pytest.mark.heavy  # a sweep, an MLflow UI and a browser: about 3-5 minutes on 2 cores
@pytest.mark.ray
def test_the_smoke_sweep_reads_in_the_mlflow_ui(local_ray, tmp_path, capsys):
    assert _main()(["--screenshots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the smoke sweep: 2 baselines + 2 probes x 2 seeds (the script checks the count)
    assert "expanding the parent lists its 6 trials" in out
    assert "its Run Name column shows each trial apart: " in out and "baseline s" in out
    assert "filter tags.`freetf.verdict`" in out and "collapse_map.png renders" in out
    assert SCREENSHOTS <= {p.name for p in tmp_path.glob("*.png")}


@pytest.mark.heavy  # no training, but an MLflow UI and a browser: about 2 minutes
def test_a_synthetic_sweep_reads_in_the_mlflow_ui(tmp_path, capsys):
    assert _main()(["--synthetic", "--screenshots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "filter metrics.`eval/verdict_code`" in out
    assert "eval/ce_gap_nats, eval/verdict_code (colour: eval/verdict_code)" in out
    assert "shown apart: kappa=4, kappa=1, kappa=1/64" in out


@pytest.mark.heavy  # an MLflow UI and a browser: about a minute
def test_trials_the_run_name_column_shows_alike_fail_the_check(tmp_path, capsys):
    """Trials named as they were before (``search_kl_smoke/free_bits_bits=...``): unique
    names, which the column cuts to the same text; the check fails naming them."""
    assert _main()(["--synthetic", "--prefixed-names", "--screenshots", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sweep_view: the Run Name column shows several trials alike: 'search_kl_smo" in err
    for kappa in ("0.01562", "1", "4"):
        assert f"search_kl_smoke/free_bits_bits={kappa},kl_weight=1" in err
    assert (tmp_path / "mlflow_failed_sweep_view.png").is_file()
