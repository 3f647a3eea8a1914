"""Multi-node semantics on one host: Ray's own harness (``ray.cluster_utils.Cluster``).

A head node and a worker node with their own resources; a 2-worker run spread over both,
writing its checkpoints to one storage_path; the worker node removed mid-run.  The run
must resume from its last checkpoint on what remains, and MLflow must hold every step
once.  Never ``ray stop`` here: the cluster is shut down by its own object.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from freetf import load_config
from freetf.tracking import mlflow_client

pytestmark = [pytest.mark.ray, pytest.mark.heavy, pytest.mark.timeout(600)]


@pytest.fixture
def two_node_cluster():
    """A head node (2 CPUs: room for both workers once alone) and a worker node (1 CPU),
    all on 127.0.0.1, with the dashboard Ray Train's cleaner must ask (see init_ray)."""
    import ray
    from ray.cluster_utils import Cluster

    from freetf.training.ray_train import OBJECT_STORE_BYTES, loopback_only

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "object_store_memory": OBJECT_STORE_BYTES})
        try:
            worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                      object_store_memory=OBJECT_STORE_BYTES)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
        except BaseException:
            cluster.shutdown()
            raise
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


class NodeRemover(threading.Thread):
    """Waits for the run's first persisted checkpoint, notes the nodes its workers run
    on, then removes the worker node."""

    def __init__(self, cluster, node, run_dir):
        super().__init__(daemon=True)
        self.cluster, self.node, self.run_dir = cluster, node, run_dir
        self.worker_nodes: set[str] = set()
        self.removed_at: float | None = None

    def run(self):
        from ray.util.state import list_actors

        deadline = time.monotonic() + 300
        # the third checkpoint (step 12) on disk: Ray has registered the first by then
        # (removed at once after the first, the restart may find none registered and
        # start over; MLflow still gets each step once, see _worker_loop)
        while max((int(p.parent.name.removeprefix("step_"))
                   for p in self.run_dir.glob("step_*/state.pt")), default=0) < 12:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                      ("state", "=", "ALIVE")])
        self.worker_nodes = {a.node_id for a in actors}
        self.cluster.remove_node(self.node)
        self.removed_at = time.time()


def test_two_node_run_survives_losing_a_node_with_every_step_logged_once(
        tmp_path, two_node_cluster):
    from freetf.training.ray_train import run_training

    cluster, worker = two_node_cluster
    steps = 120
    cfg = load_config("freetf/configs/tiny.yaml", [
        f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"scaling.storage_path={tmp_path}/shared", "scaling.run_name=two_nodes",
        f"checkpoint.dir={tmp_path}/ckpt", "scaling.num_workers=2",
        "scaling.cpus_per_worker=1", "scaling.placement_strategy=SPREAD",
        "scaling.max_failures=2", "training.batch_size=4", f"training.max_steps={steps}",
        "training.log_every=1", "checkpoint.every_steps=4", "checkpoint.keep=2",
        "checkpoint.metric=step", "checkpoint.mode=max", "diagnostics.free_generations=0",
        "data.num_samples=256"])
    remover = NodeRemover(cluster, worker, tmp_path / "shared" / "two_nodes")
    remover.start()
    summary = run_training(cfg)
    remover.join(timeout=10)
    assert summary.error is None, summary.error
    assert remover.removed_at is not None, "the run ended before its first checkpoint"
    assert len(remover.worker_nodes) == 2  # one worker on each node
    assert summary.metrics["step"] == steps
    # the final report comes from workers started after the node was removed
    assert summary.metrics["timeline/process_start"] > remover.removed_at - 1
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("train/loss", "train/steps_done"):
        logged = [m.step for m in client.get_metric_history(summary.run_id, key)]
        assert sorted(logged) == list(range(1, steps + 1)), key  # none lost, none twice
    assert summary.checkpoint.parent == tmp_path / "shared" / "two_nodes"
    # the restarted rank 0 resumed from a checkpoint, not from scratch
    logs = Path(cluster.head_node.get_logs_dir_path())
    resumed = [int(m) for path in logs.glob("worker-*") for m in
               re.findall(r"resumed from \S+ at step (\d+)", path.read_text(errors="replace"))]
    assert resumed and min(resumed) >= 4, resumed


def test_a_sweep_spreads_its_trials_over_both_nodes(tmp_path, two_node_cluster):
    """Four one-CPU trials on a head (2 CPUs) and a worker node (1 CPU): three run at once,
    so both nodes train trials; each child run says on which node (``freetf.ray_node``)
    and every trial ends in the one MLflow store and report."""
    from ray.util.state import list_nodes

    from freetf.sweeps.spec import load_sweep
    from freetf.sweeps.sweep import run_sweep

    sweep = load_sweep("freetf/configs/search_kl_smoke.yaml", [
        f"storage_path={tmp_path}/shared", f"report_dir={tmp_path}/reports",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.sweep_name=two_nodes",
        "search.method=grid", "asha.enabled=false", "stopper.enabled=false",
        "resources.cpus_per_trial=0.01", "resources.cpus_per_worker=0.99",
        "training.max_steps=30", "training.eval_every=30", "training.log_every=10",
        "space.training.free_bits_bits={grid: [0.25, 1.0]}",
        "space.training.kl_weight={grid: [0.1, 1.0]}"])
    result = run_sweep(sweep)
    assert not result.interrupted
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name(result.experiment).experiment_id],
        "tags.`freetf.role` = 'trial' and tags.`freetf.sweep` = 'two_nodes'")
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    nodes = {run.data.tags["freetf.ray_node"] for run in runs}
    assert nodes == {node.node_id for node in list_nodes()}  # trials on both nodes
    assert len(nodes) == 2
