"""What tools/quickstart_check.py asks a server for once the commands before it ran: the
MLflow links, run ids and sweep summaries the commands printed, looked up through MLflow's
REST API 2.0."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LINK = re.compile(r"(https?://[\w.:\-\[\]]+)/#/experiments/(\d+)/runs")
RUN = re.compile(r"MLflow run ([0-9a-f]{32})\b")
TRIALS = re.compile(r"^(\d+) trials: ", re.M)


class CheckFailed(RuntimeError):
    """A server did not answer, or did not list what the commands printed."""


@dataclasses.dataclass
class Printed:
    """What the commands printed that a store must list."""

    bases: set[str] = dataclasses.field(default_factory=set)        # where links point
    experiments: set[str] = dataclasses.field(default_factory=set)  # linked experiment ids
    runs: set[str] = dataclasses.field(default_factory=set)         # named run ids
    sweeps: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (id, trials)


def printed_references(outputs: list[str]) -> Printed:
    """The links, run ids and sweep summaries (``N trials: ...`` followed by the link to
    the sweep's experiment) in the commands' outputs."""
    found = Printed()
    for text in outputs:
        for link in LINK.finditer(text):
            found.bases.add(link[1])
            found.experiments.add(link[2])
        found.runs.update(RUN.findall(text))
        for trials in TRIALS.finditer(text):
            link = LINK.search(text, trials.end())
            if link:
                found.sweeps.append((link[2], int(trials[1])))
    return found


def rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    """MLflow's REST API 2.0: GET ``endpoint``, or POST ``body`` to it."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}", headers={"Content-Type": "application/json"},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)
    except OSError as err:
        raise CheckFailed(f"{endpoint}: {err}") from None


def check_store(url: str, written: str, outputs: list[str]) -> list[str]:
    """Ask the server at ``url`` for what the commands printed: each experiment linked, each
    run named, each sweep's newest parent run with as many trial runs as it counted.  The
    links must point at ``written``, where the README's server command listens."""
    sys.path.insert(0, str(ROOT))
    from freetf.tracking.tags import ROLE

    found = printed_references(outputs)
    if not (found.experiments or found.runs):
        raise CheckFailed("the commands before printed no MLflow link or run to look for")
    elsewhere = found.bases - {written}
    if elsewhere:
        raise CheckFailed(f"the links printed point at {sorted(elsewhere)}, not at {written}")
    listed = {e["experiment_id"]: e["name"]
              for e in rest(url, "experiments/search", {"max_results": 1000})
              .get("experiments", [])}
    missing = sorted(found.experiments - set(listed))
    if missing:
        raise CheckFailed(f"experiments/search does not list the experiments {missing} "
                          f"(it lists {listed})")
    seen = [f"the links printed point at {written}, where the command as written listens",
            "lists the experiments linked: "
            + ", ".join(f"{listed[e]} ({e})" for e in sorted(found.experiments))]
    for run_id in sorted(found.runs):
        info = rest(url, f"runs/get?run_id={run_id}").get("run", {}).get("info", {})
        if info.get("status") != "FINISHED":
            raise CheckFailed(f"run {run_id}: status {info.get('status')}, not FINISHED")
        seen.append(f"run {info.get('run_name')} ({run_id}) FINISHED")
    for experiment, trials in found.sweeps:
        parents = rest(url, "runs/search", {
            "experiment_ids": [experiment], "filter": f"tags.`{ROLE}` = 'sweep'",
            "order_by": ["attributes.start_time DESC"], "max_results": 1}).get("runs", [])
        if not parents:
            raise CheckFailed(f"experiment {listed[experiment]}: no sweep parent run")
        parent = parents[0]["info"]
        children = rest(url, "runs/search", {
            "experiment_ids": [experiment], "max_results": 1000,
            "filter": f"tags.`mlflow.parentRunId` = '{parent['run_id']}'"}).get("runs", [])
        if len(children) != trials:
            raise CheckFailed(f"sweep {parent['run_name']}: {len(children)} trial runs, "
                              f"the sweep counted {trials}")
        seen.append(f"sweep {parent['run_name']} in {listed[experiment]}: "
                    f"{len(children)} trial runs, as counted")
    return seen
