"""`ray start --head` + `ray job submit -- freetf train` on 127.0.0.1, end to end."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess

import pytest

from freetf.tracking import mlflow_client
from freetf.training.ray_ready import wait_for_job_agent

# ~90 s on an idle 2-core machine; with two CPU-bound processes beside the suite the job
# alone took over 6 minutes (Ray's worker start times out and retries): bounds, not a benchmark.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_processes(gcs_port: int) -> list:
    """The processes of the local Ray cluster whose GCS listens on ``gcs_port``: the daemons
    that name it, every process of their session (its dir is on their command lines), and
    their children (the workers)."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in ours]

    def args(p) -> list[str]:
        return p.info["cmdline"] or []

    markers = (f"127.0.0.1:{gcs_port}", f"--gcs_server_port={gcs_port}")
    roots = [p for p in procs if any(a.endswith(markers) for a in args(p))]
    sessions = {m.group(0) for p in roots for a in args(p)
                if (m := re.search(r"/[^\s=]*/session_[^/\s]+", a))}
    found = {p.pid: p for p in procs
             if p in roots or any(s in a for s in sessions for a in args(p))}
    for p in list(found.values()):
        try:
            found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_cluster(gcs_port: int) -> None:
    """Stop this test's cluster only: ``ray stop`` would stop every Ray on the machine,
    a user's running sweeps included."""
    import psutil

    procs = cluster_processes(gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        p.kill()


@pytest.fixture
def ray_head(tmp_path):
    # A token of the test's own: a fresh machine has no ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent = free_port(), free_port(), free_port()
    try:
        subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={gcs}", "--num-cpus=2", f"--dashboard-port={dash}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                        "--object-store-memory=300000000", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        # `ray start` returns before the head's job agent is up: wait for it (bounded).
        wait_for_job_agent(f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{agent}",
                           timeout_s=240)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_cluster(gcs)
        assert not cluster_processes(gcs), "the test's Ray cluster outlived its test"


def test_ray_job_submit_trains_and_logs(ray_head, tmp_path):
    address, env = ray_head
    db = tmp_path / "mlflow.db"
    command = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
               "freetf", "train", "--config", "freetf/configs/tiny.yaml",
               "--set", "training.max_steps=4",
               "--set", f"tracking.mlflow.tracking_uri=sqlite:///{db}",
               "--set", f"scaling.storage_path={tmp_path}/ray_results",
               "--set", "tracking.mlflow.experiment=job-e2e"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    client = mlflow_client(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("job-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/steps_done"] == 4
