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


@pytest.mark.heavy  # a sweep, an MLflow UI and a browser: about 3-5 minutes on 2 cores
@pytest.mark.ray
def test_the_smoke_sweep_reads_in_the_mlflow_ui(local_ray, tmp_path, capsys):
    assert _main()(["--screenshots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the smoke sweep: 2 baselines + 2 probes x 2 seeds (the script checks the count)
    assert "expanding the parent lists its 6 trials" in out
    assert "filter tags.`freetf.verdict`" in out and "collapse_map.png renders" in out
    assert SCREENSHOTS <= {p.name for p in tmp_path.glob("*.png")}


@pytest.mark.heavy  # no training, but an MLflow UI and a browser: about 2 minutes
def test_a_synthetic_sweep_reads_in_the_mlflow_ui(tmp_path, capsys):
    assert _main()(["--synthetic", "--screenshots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "filter metrics.`eval/verdict_code`" in out
    assert "eval/ce_gap_nats, eval/verdict_code (colour: eval/verdict_code)" in out
