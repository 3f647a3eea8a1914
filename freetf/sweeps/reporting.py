"""A sweep's report from its MLflow runs alone (``freetf report``): the collapse map of an
experiment's trials (:mod:`freetf.results.report`), and for each sweep that trained
baselines its analysis against them, with the sweep's spec read back from its parent
run (:mod:`freetf.results.analysis`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from freetf.results import analysis
from freetf.results.over_training import HISTORY_METRICS
from freetf.results.report import (
    ReportError,
    collect_histories,
    collect_runs,
    summary_text,
    write_report,
)

log = logging.getLogger(__name__)


def report(experiment: str, tracking_uri: str | None, out: str | Path,
           sweep: str | None = None) -> str:
    """The console text of ``freetf report``; the files under ``out/<sweep or experiment>``.

    Raises :class:`ReportError` when there is no store or no trial run to report."""
    from freetf.config import load_config
    from freetf.tracking import mlflow_client, resolve_tracking_uri

    uri = resolve_tracking_uri(load_config(
        overrides={"tracking.mlflow.tracking_uri": tracking_uri}))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {uri}; pass --tracking-uri")
    client = mlflow_client(uri)
    df = collect_runs(client, experiment, sweep=sweep)
    if df.empty:
        raise ReportError(f"experiment {experiment!r} at {uri} has no sweep trial "
                          f"runs (tag freetf.role=trial)")
    folder = Path(out) / (sweep or experiment)
    paths = write_report(client, df, folder)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    lines = [summary_text(df, paths, uri, experiment, experiment_id)]
    for name, found in analyse_sweeps(client, experiment, df, folder).items():
        lines += ["", f"sweep {name}: verdicts against its baselines", *found]
    return "\n".join(lines)


def analyse_sweeps(client, experiment: str, df: pd.DataFrame,
                   out: Path) -> dict[str, list[str]]:
    """The sweep's own analysis (:func:`freetf.results.analysis.analyse_sweep`) for each
    sweep of ``df`` that trained baselines: verdicts against them, kappa_c / kappa_l,
    written to ``out/<sweep>/`` (``boundaries.md``, ``verdicts.csv``, the phase diagram).

    The sweep's spec is read back from its parent run (``search_space.yaml``); where
    that is gone (or its base config is not on this machine) the defaults stand in.
    Returns each analysed sweep's console lines."""
    from freetf.config import ConfigError
    from freetf.sweeps.spec import SweepError, load_sweep
    from freetf.tracking import find_parent, run_artifact_text

    found: dict[str, list[str]] = {}
    for name, runs in df.groupby("sweep", sort=True):
        if not (runs["model_kind"] == "baseline").any():
            continue
        histories = collect_histories(client, list(runs["run_id"]), HISTORY_METRICS)
        parent = find_parent(client, experiment, name)
        text = run_artifact_text(client, parent.info.run_id, "search_space.yaml") \
            if parent is not None else None
        try:
            if text is None:
                raise SweepError("no search_space.yaml on the sweep's parent run")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "sweep.yaml").write_text(text)
                spec = load_sweep(Path(tmp) / "sweep.yaml")
                result = analysis.analyse_sweep(runs, spec, spec.base(), histories)
        except (SweepError, ConfigError, OSError) as err:
            log.info("sweep %s: its spec is not usable here (%s); analysed with the "
                     "defaults", name, err)
            result = analysis.analyse(runs, histories=histories)
        paths = analysis.write_analysis(result, out / name)
        found[name] = [analysis.boundaries_table(result), *result.summary_lines(),
                       f"boundaries:    {paths['boundaries']}",
                       f"phase diagram: {paths['phase']}"]
    return found
