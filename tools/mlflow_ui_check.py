"""Open a sweep in a real MLflow UI with headless Chromium, check what a reader sees, and
take the screenshots of docs/mlflow.md.

    python tools/mlflow_ui_check.py                     # runs the smoke sweep (~1-2 min)
    python tools/mlflow_ui_check.py --synthetic         # a made-up sweep, no Ray (seconds)
    python tools/mlflow_ui_check.py --synthetic --prefixed-names   # fails: names alike
    python tools/mlflow_ui_check.py --tracking-uri sqlite:///$PWD/mlflow.db \\
        --experiment freetf-search-kl                   # a sweep you already ran
    python tools/mlflow_ui_check.py --screenshots docs/img   # refresh the docs' images

Needs Debian's chromium and chromium-driver (``apt-get install -y chromium
chromium-driver``; or set CHROMIUM / CHROMEDRIVER) and selenium (the ``ui`` extra).
It starts ``mlflow ui`` on a free port of 127.0.0.1 and checks, failing with a message
naming what it did not find:

0. the link the sweep prints (its saved view, :func:`freetf.results.summary.save_sweep_view`)
   opens the sweep's trials grouped by verdict, each by its name, with the view's columns,
   and the Run Name column shows each trial by a text of its own (as cut by the column's
   width: ``kappa=1/4 s1``, not ``search_kl_smo...`` for every trial);
1. the runs page link (:func:`freetf.tracking.runs_page_url`) opens the runs table in the
   model-training view, with the sweep's parent run;
2. expanding the parent lists every trial run by name, each shown apart;
3. the filter ``tags.`freetf.verdict` = '<v>'`` keeps exactly the trials of that verdict,
   and ``metrics.`eval/verdict_code` = <code>`` the same ones;
4. the ``eval/verdict_code`` and ``log2_free_bits_bits`` columns can be added to the table;
5. the parent's collapse map (``report/collapse_map.png``) renders in its artifacts;
6. the compare view of the trials offers ``log2_free_bits_bits``, ``eval/ce_gap_nats``
   and ``eval/verdict_code``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.mlflow_ui_pages import UICheckError, check_ui  # noqa: E402 - after sys.path

SMOKE = ROOT / "freetf" / "configs" / "search_kl_smoke.yaml"


# ----------------------------------------------------------------------------- stores


def smoke_sweep_store(root: Path) -> tuple[str, str]:
    """Run the smoke sweep into ``root``; its tracking URI and experiment name."""
    from freetf.sweeps.sweep import load_sweep, run_sweep

    sweep = load_sweep(SMOKE, _store_settings(root))
    result = run_sweep(sweep)
    return result.tracking_uri, result.experiment


def synthetic_store(root: Path, prefixed_names: bool = False) -> tuple[str, str]:
    """A sweep of the smoke grid whose trials log made-up curves (one per verdict), through
    the same tracking code as a real sweep; no training, no Ray.  For checking the UI.
    ``prefixed_names``: name the trials as sweeps once did, ``<sweep>/<key>=<value>,...``
    (``search_kl_smoke/free_bits_bits=1,kl_weight=1``), which the Run Name column cuts to
    the same text for every trial."""
    from freetf.results import report
    from freetf.results.summary import log_sweep_summary, save_sweep_view
    from freetf.sweeps.runs import space_params
    from freetf.sweeps.sweep import (
        TAG_KEY,
        TAG_ROLE,
        TAG_SWEEP,
        load_sweep,
        trial_key,
        trial_run_name,
    )
    from freetf.tracking import log_verdict, make_tracker, mlflow_client

    sweep = load_sweep(SMOKE, _store_settings(root))
    base = sweep.base()
    keys = tuple(d.key for d in sweep.space)
    parent = make_tracker(base, run_name=sweep.name, params=space_params(sweep),
                          tags={TAG_SWEEP: sweep.name, TAG_ROLE: "sweep"})
    steps = base.training.max_steps
    for kappa, verdict in ((0.015625, "collapsed"), (1.0, "active"), (4.0, "leaking")):
        sampled = {"training.free_bits_bits": kappa, "training.kl_weight": 1.0}
        name = (f"{sweep.name}/" + ",".join(f"{k.rsplit('.', 1)[1]}={v:.4g}"
                                            for k, v in sampled.items())
                if prefixed_names else trial_run_name(sampled, sweep.named_keys))
        cfg = base.replace({**sampled, "tracking.mlflow.run_name": name})
        child = make_tracker(cfg, parent_run_id=parent.run_id, run_name=name, searched=keys,
                             tags={TAG_SWEEP: sweep.name, TAG_ROLE: "trial",
                                   TAG_KEY: trial_key(sampled), "freetf.sampled":
                                   json.dumps(sampled), "freetf.stopped_early": "false"})
        for step in range(5, steps + 1, 5):
            t = step / steps
            kl_bits = {"collapsed": 0.001, "active": kappa, "leaking": kappa * (1 + t)}[verdict]
            posterior = 1.2 - (0.6 * t if verdict == "leaking" else 0.1 * t)
            child.log_metrics({
                "train/loss": 2.0 - 0.5 * t, "train/kl_bits": kl_bits,
                "train/kl_nats": kl_bits * 0.6931, "train/free_bits_bits": kappa,
                "eval/ce_prior_nats": 1.3 - 0.1 * t + (0.2 * t if verdict == "leaking" else 0),
                "eval/ce_posterior_nats": posterior, "eval/kl_bits": kl_bits,
                "eval/ce_gap_nats": (1.3 - 0.1 * t) - posterior, "train/steps_done": step},
                step=step)
        log_verdict(child, verdict, steps)
        child.finish()
    client = mlflow_client(base.tracking.mlflow.tracking_uri)
    runs = report.collect_runs(client, base.tracking.mlflow.experiment, sweep=sweep.name)
    for path in report.write_report(client, runs, sweep.report_path).values():
        parent.log_artifact(path, "report")
    log_sweep_summary(parent, client, runs, sweep.report_path)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    save_sweep_view(client, experiment_id, sweep.name, sweep.named_keys)  # as run_sweep does
    parent.finish()
    return base.tracking.mlflow.tracking_uri, base.tracking.mlflow.experiment


def _store_settings(root: Path) -> list[str]:
    return [f"storage_path={root / 'ray_results'}", f"report_dir={root / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"]


# ----------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowUI:
    """``mlflow ui`` on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, tracking_uri: str, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log_path.open("w")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
             "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise UICheckError(f"mlflow ui did not come up; see {log_path}") from None
                time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tracking-uri", help="check a sweep already in this store")
    source.add_argument("--synthetic", action="store_true",
                        help="a made-up sweep through the tracking code, no training")
    parser.add_argument("--prefixed-names", action="store_true",
                        help="with --synthetic: name the trials <sweep>/<key>=<value>,... "
                        "as sweeps once did (the check fails: the Run Name column shows "
                        "every trial alike)")
    parser.add_argument("--experiment", default=None,
                        help="with --tracking-uri: the sweep's experiment")
    parser.add_argument("--sweep", default=None, help="the sweep's name (default: the newest)")
    parser.add_argument("--screenshots", type=Path,
                        default=Path(tempfile.gettempdir()) / "freetf-ui-screenshots",
                        help="write the screenshots here (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.prefixed_names and not args.synthetic:
        parser.error("--prefixed-names goes with --synthetic")

    with tempfile.TemporaryDirectory(prefix="freetf-ui-") as tmp:
        root = Path(tmp)
        if args.tracking_uri:
            if not args.experiment:
                parser.error("--tracking-uri needs --experiment")
            uri, experiment = args.tracking_uri, args.experiment
        elif args.synthetic:
            uri, experiment = synthetic_store(root, args.prefixed_names)
        else:
            uri, experiment = smoke_sweep_store(root)
        ui = MlflowUI(uri, root / "mlflow_ui.log")
        try:
            seen = check_ui(ui.url, uri, experiment, args.sweep, args.screenshots)
        except UICheckError as err:
            print(f"FAILED  {err}\nmlflow ui log: {root / 'mlflow_ui.log'}", file=sys.stderr)
            return 1
        finally:
            ui.close()
    for line in seen:
        print(f"ok  {line}")
    print(f"screenshots in {args.screenshots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
