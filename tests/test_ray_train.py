"""Ray Train end to end on CPU: TorchTrainer + MLflow, DDP equivalence, fault tolerance.

Each ``fit`` with worker processes costs ~25 s of start-up here, so the module keeps one
Ray instance for all its tests and shuts it down at the end.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from freetf import load_config
from freetf.tracking import mlflow_client
from freetf.training.checkpoint import load_checkpoint, load_model
from freetf.training.loop import train_loop
from freetf.training.ray_train import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def cfg_for(tmp_path, *extra):
    return load_config("freetf/configs/tiny.yaml", [
        f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"scaling.storage_path={tmp_path}/ray_results", f"checkpoint.dir={tmp_path}/ckpt",
        "scaling.cpus_per_worker=0.5", "training.log_every=1", "data.num_samples=256", *extra])


def test_one_worker_matches_in_process_and_logs_to_mlflow(tmp_path):
    cfg = cfg_for(tmp_path, "training.max_steps=6", "scaling.run_name=one")
    summary = run_training(cfg)
    assert summary.error is None, summary.error
    reference = train_loop(cfg.replace(["tracking.mlflow.enabled=false"]))
    assert summary.metrics["train/loss"] == pytest.approx(reference.metrics["train/loss"],
                                                          rel=1e-5)
    # the Ray checkpoint is self-describing and loads without Ray
    model, ckpt_cfg, state = load_model(summary.checkpoint)
    assert state["step"] == 6 and ckpt_cfg.model == cfg.model
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["kl_weight"] == "1"
    assert run.data.tags["freetf.model_kind"] == "free_transformer"
    assert run.data.tags["freetf.verdict"] in {"collapsed", "used", "leaking"}
    steps = [m.step for m in client.get_metric_history(summary.run_id, "train/kl_nats")]
    assert steps == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "training_curves.png", "samples.txt"} <= artifacts


def test_two_workers_equal_one_worker_with_double_batch(tmp_path):
    two = cfg_for(tmp_path / "two", "training.max_steps=3", "training.batch_size=4",
                  "scaling.num_workers=2", "tracking.mlflow.enabled=false",
                  "scaling.run_name=ddp")
    summary = run_training(two)
    assert summary.error is None, summary.error
    one = train_loop(cfg_for(tmp_path / "one", "training.max_steps=3", "training.batch_size=8",
                             "tracking.mlflow.enabled=false"))
    ddp_state, _ = load_checkpoint(summary.checkpoint)
    ref_state, _ = load_checkpoint(one.checkpoint)
    moved = 0
    for key, ref in ref_state["model"].items():
        assert torch.allclose(ddp_state["model"][key], ref, atol=2e-6), key
        moved += 1
    assert moved > 10
    # each rank's generators, gathered over the process group
    assert len(ddp_state["rng"]) == 2
    assert not torch.equal(ddp_state["rng"][0]["cpu"], ddp_state["rng"][1]["cpu"])


def test_worker_failure_resumes_from_last_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, "training.max_steps=8", "checkpoint.every_steps=2",
                  "checkpoint.keep=2", "training.fail_at_step=5", "scaling.max_failures=1",
                  "scaling.run_name=ft")
    summary = run_training(cfg)
    assert summary.error is None, summary.error
    assert summary.metrics["step"] == 8
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    # steps 1-5 ran, step 6 failed; the restart resumed at the step-4 checkpoint and
    # replayed step 5, which is logged once
    for key in ("train/loss", "train/steps_done", "eval/ce_prior_nats"):
        steps = sorted(m.step for m in client.get_metric_history(summary.run_id, key))
        assert steps == (list(range(1, 9)) if key != "eval/ce_prior_nats" else [2, 4, 6, 8])
    # checkpoint.keep=2 keeps two (each checkpoint's report carries checkpoint.metric)
    kept = sorted(p.name for p in (tmp_path / "ray_results" / "ft").glob("step_*"))
    assert kept == ["step_000006", "step_000008"]


def test_failure_without_retries_marks_the_run_failed(tmp_path):
    cfg = cfg_for(tmp_path, "training.max_steps=4", "training.fail_at_step=1",
                  "scaling.num_workers=0", "scaling.run_name=fail")
    summary = run_training(cfg)
    assert summary.error is not None
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(summary.run_id).info.status == "FAILED"


def test_no_scratch_folder_outlives_a_local_mode_run(tmp_path, monkeypatch):
    """Ray Train's local mode runs the worker in this process: the system temp dir (here
    an empty test folder) is empty again after a run that ends, one that resumes and one
    that fails."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def left():  # torch's compile cache (torchinductor_<user>) is meant to stay
        return [p for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]

    def run(*extra, resume=None):
        return run_training(cfg_for(tmp_path, "scaling.num_workers=0", "scaling.run_name=tmp",
                                    "tracking.mlflow.enabled=false", *extra), resume=resume)

    ended = run("training.max_steps=2")
    assert ended.error is None and left() == []
    resumed = run("training.max_steps=4", resume=str(ended.checkpoint))
    assert resumed.error is None and resumed.metrics["step"] == 4 and left() == []
    failed = run("training.max_steps=4", "training.fail_at_step=1", "scaling.run_name=failing")
    assert failed.error is not None and left() == []


def test_metric_only_reports_are_thinned_but_essential_ones_always_go(monkeypatch, tmp_path):
    import ray.train
    import ray.train.torch

    from freetf.training import ray_train

    class FakeContext:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    sent, clock = [], [0.0]
    monkeypatch.setattr(ray.train, "get_context", lambda: FakeContext())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: sent.append(metrics["step"]))
    monkeypatch.setattr(ray_train.time, "monotonic", lambda: clock[0])
    ctx = ray_train.RayTrainContext(report_interval_s=2.5)
    for step in range(1, 11):  # a log step every second, an eval at step 4
        clock[0] = float(step)
        ctx.report({"step": step}, essential=step == 4)
    assert sent == [1, 4, 7, 10]
    assert [h["step"] for h in ctx.history] == list(range(1, 11))
    every = ray_train.RayTrainContext(report_interval_s=0.0)
    sent.clear()
    for step in range(1, 4):
        every.report({"step": step}, essential=False)
    assert sent == [1, 2, 3]


def test_with_several_workers_rank_zeros_clock_decides_every_report(monkeypatch):
    """ray.train.report is a collective: a rank whose own clock says 'due' follows rank 0."""
    import ray.train
    import ray.train.torch

    from freetf.training import ray_train

    class RankOne:
        def get_world_rank(self):
            return 1

        def get_world_size(self):
            return 2

    rank_zero_says = []  # the flags rank 0 broadcasts, in order

    def broadcast(tensor, src):
        assert src == 0
        tensor.fill_(rank_zero_says.pop(0))

    sent, clock = [], [0.0]
    monkeypatch.setattr(ray.train, "get_context", lambda: RankOne())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: sent.append(metrics["step"]))
    monkeypatch.setattr(ray_train.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    ctx = ray_train.RayTrainContext(report_interval_s=2.5)
    rank_zero_says.extend([1.0, 0.0, 1.0])
    for step in (1, 2, 3):
        clock[0] = 10.0 * step  # this rank's clock: always due
        ctx.report({"step": step}, essential=False)
    assert sent == [1, 3] and not rank_zero_says


def _listening(pids):
    """(pid, name, ip, port) of every TCP socket listening, and UDP socket bound, in ``pids``."""
    import socket

    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM
                                                     and not conn.raddr):
                found.append((pid, name, conn.laddr.ip, conn.laddr.port))
    return found


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_local_ray_listens_on_loopback_only():
    """Every server of this process's local Ray (GCS, raylet, dashboard and its agents,
    runtime-env agent, driver, an actor and a task worker) listens on loopback only.
    Only this run's processes are looked at: other Ray instances may run on the machine."""
    import psutil
    import ray

    @ray.remote(num_cpus=0)
    class Holder:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def task():
        return True

    holder = Holder.remote()
    assert ray.get([holder.ping.remote(), task.remote()]) == [True, True]
    me = psutil.Process()
    pids = [me.pid] + [p.pid for p in me.children(recursive=True)]
    names = {name for _, name, _, _ in _listening(pids)}
    sockets = _listening(pids)
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names)
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    ray.kill(holder)


@pytest.mark.heavy
def test_during_a_fit_only_torchs_rendezvous_store_listens_beyond_loopback(tmp_path):
    """While a 1-worker run trains, every listener of this run's processes is on loopback
    except rank 0's torch.distributed TCPStore, which torch binds to all interfaces
    (docs/reliability.md); it is one port, in the Ray Train worker."""
    import threading

    import psutil

    seen: set = set()
    stop = threading.Event()

    def watch():
        me = psutil.Process()
        while not stop.is_set():
            pids = [me.pid] + [p.pid for p in me.children(recursive=True)]
            seen.update(_listening(pids))
            stop.wait(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = run_training(cfg_for(tmp_path, "training.max_steps=30",
                                       "tracking.mlflow.enabled=false", "scaling.run_name=lb"))
    finally:
        stop.set()
        watcher.join()
    assert summary.error is None, summary.error
    assert any("RayTrainWorker" in name for _, name, _, _ in seen)  # the watch saw the fit
    exposed = {(name, port) for _, name, ip, port in seen if not _is_loopback(ip)}
    assert all("RayTrainWorker" in name for name, _ in exposed), exposed
    assert len({port for _, port in exposed}) <= 1, exposed


def test_loopback_check_sees_a_wildcard_socket():
    """The check above can fail: a socket on 0.0.0.0 in this process is reported."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        exposed = [s for s in _listening([os.getpid()]) if not _is_loopback(s[2])]
        assert any(s[3] == sock.getsockname()[1] for s in exposed)
    assert _is_loopback("::ffff:127.0.0.1") and _is_loopback("::1")
    assert not _is_loopback("::") and not _is_loopback("192.0.2.2")


def _train_and_generate_from_the_printed_checkpoint(tmp_path, capsys, num_workers):
    from freetf.cli import main

    assert main(["train", "--config", "freetf/configs/tiny.yaml", "--max-steps", "4",
                 "--num-workers", str(num_workers),
                 "--set", f"scaling.storage_path={tmp_path}/ray_results",
                 "--set", f"scaling.run_name=printed{num_workers}",
                 "--set", "scaling.cpus_per_worker=0.5", "--set", "data.num_samples=256",
                 "--set", "tracking.mlflow.enabled=false"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("checkpoint: ")]
    assert len(lines) == 1
    printed = lines[0].removeprefix("checkpoint: ")
    # persisted under storage_path/run_name, not a staging folder Ray deleted
    assert printed == f"{tmp_path}/ray_results/printed{num_workers}/step_000004"
    assert main(["generate", "--checkpoint", printed, "--prompt", "K>", "--num-samples",
                 "1", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip().startswith("K>")


def test_local_mode_prints_a_checkpoint_that_generate_reads(tmp_path, capsys):
    """num_workers=0 (Ray Train's local mode, the loop in the driver)."""
    _train_and_generate_from_the_printed_checkpoint(tmp_path, capsys, num_workers=0)


@pytest.mark.heavy
def test_one_worker_prints_a_checkpoint_that_generate_reads(tmp_path, capsys):
    _train_and_generate_from_the_printed_checkpoint(tmp_path, capsys, num_workers=1)


def _diverging_train(tmp_path, num_workers, *extra):
    from freetf.cli import main

    return main(["train", "--config", "freetf/configs/tiny.yaml", "--max-steps", "20",
                 "--num-workers", str(num_workers),
                 "--set", f"scaling.storage_path={tmp_path}/ray_results",
                 "--set", f"scaling.run_name=nf{num_workers}",
                 "--set", "checkpoint.every_steps=2", "--set", "scaling.max_failures=1",
                 "--set", "scaling.cpus_per_worker=0.5", "--set", "data.num_samples=256",
                 "--set", "tracking.mlflow.enabled=false", *extra])


def _stop_message_checkpoint(err: str) -> str:
    assert "Traceback" not in err, err
    assert "The last checkpoint is " in err, err
    assert "steps in a row had a non-finite loss or gradient" in err
    assert "grad_clip" not in err  # on in tiny.yaml
    line = next(x for x in err.splitlines() if x.startswith("The last checkpoint is "))
    return line.removeprefix("The last checkpoint is ").split(";")[0]


def test_nonfinite_stop_in_local_mode_points_at_the_persisted_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    import freetf.training.loop as loop
    from freetf.model.losses import compute_loss as real

    calls = {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        total, parts = real(*args, **kwargs)
        return (total * float("nan") if calls["n"] >= 5 else total), parts

    monkeypatch.setattr(loop, "compute_loss", diverging)
    assert _diverging_train(tmp_path, 0) == 1
    checkpoint = _stop_message_checkpoint(capsys.readouterr().err)
    # the weights at the stop (the last finite update), saved so that Ray hears of the stop
    assert checkpoint == f"{tmp_path}/ray_results/nf0/step_000009"
    state, _ = load_checkpoint(checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.heavy
def test_nonfinite_stop_with_a_worker_points_at_the_persisted_checkpoint(tmp_path, capsys):
    """A real divergence (learning rate 1e30) in a worker process: no retry, no traceback."""
    assert _diverging_train(tmp_path, 1, "--learning-rate", "1e30",
                            "--set", "data.num_samples=512") == 1
    checkpoint = _stop_message_checkpoint(capsys.readouterr().err)
    assert checkpoint.startswith(f"{tmp_path}/ray_results/nf1/step_")
    state, _ = load_checkpoint(checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.heavy
def test_sigterm_stops_the_workers_at_a_step_and_marks_the_run_killed(tmp_path):
    """SIGTERM to the driver of a run with a worker (a scheduler's stop): the driver
    hands the stop to the worker, which finishes its step and checkpoints; Ray persists
    it.  Exit 143, one line naming the persisted checkpoint, the MLflow run KILLED, and
    no C++ stack dump (before: Ray's own SIGTERM handler, exit 134, run FAILED)."""
    import re
    import signal

    from train_helpers import train_until_signal

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, out = train_until_signal(
        ["train", "--verbose", "--config", "configs/tiny.yaml", "--max-steps", "100000",
         "--num-workers", "1", "--set", "training.log_every=1",
         "--set", f"scaling.storage_path={tmp_path}/ray_results",
         "--set", "scaling.run_name=term", "--set", "scaling.cpus_per_worker=0.5",
         "--set", f"tracking.mlflow.tracking_uri={uri}"], "step 3/100000", signal.SIGTERM,
        timeout_s=500)
    assert code == 143, out
    for sign in ("Traceback", "Aborted", "Stack trace", "*** SIG"):
        assert sign not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("freetf train:")]
    found = re.fullmatch(r"freetf train: stopped by SIGTERM after step (\d+); checkpoint: "
                         r"(\S+) \(continue with --resume \2\)", line)
    assert found, line
    assert found[2] == f"{tmp_path}/ray_results/term/step_{int(found[1]):06d}"
    assert load_checkpoint(found[2])[0]["step"] == int(found[1])
    client = mlflow_client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("freetf-tiny").experiment_id])
    assert run.info.status == "KILLED"


def _in_a_small_tmpfs(folder, size, argv, then):
    """``freetf <argv>`` with a ``size`` tmpfs mounted at ``folder``, in a mount namespace
    of its own (``unshare --mount``, as root), then the shell command ``then`` there
    (the tmpfs goes with the namespace).  -> (freetf's exit code, its output, then's
    output).  The test is skipped where the mount is refused."""
    import shlex
    import shutil
    import subprocess
    import sys

    folder.mkdir()
    mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))}"
    probe = (subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True,
                            text=True) if shutil.which("unshare") else None)
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip() if probe else 'no unshare'}")
    train = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "freetf", *argv])
    proc = subprocess.run(["unshare", "--mount", "sh", "-c",
                           f"{mount} && {train} 2>&1; echo \"@@exit $?\"; {then}"],
                          capture_output=True, text=True, timeout=600)
    out, _, after = proc.stdout.partition("@@exit ")
    code, _, after = after.partition("\n")
    return int(code), out + proc.stderr, after


@pytest.mark.heavy
def test_a_full_storage_path_is_one_line_naming_the_last_persisted_checkpoint(tmp_path):
    """scaling.storage_path on a 5 MB tmpfs that fills during Ray's copy of a checkpoint:
    one line names it, the cause and the last persisted checkpoint, no traceback; the
    storage holds whole checkpoints only, and the named one loads (before: four
    tracebacks, and a step_000050 with a 0-byte config.yaml beside the good step_000040)."""
    import sys

    storage = tmp_path / "full"
    run = storage / "run"
    code, out, after = _in_a_small_tmpfs(storage, "5m", [
        "train", "--config", "configs/tiny.yaml", "--max-steps", "40", "--num-workers", "1",
        "--set", "model.hidden_dim=64", "--set", "checkpoint.every_steps=2",
        "--set", "checkpoint.keep=100", "--set", "checkpoint.metric=step",
        "--set", "checkpoint.mode=max", "--set", f"scaling.storage_path={storage}",
        "--set", "scaling.run_name=run", "--set", "scaling.cpus_per_worker=0.5",
        "--set", "tracking.mlflow.enabled=false"],
        then=f"ls -a {run}; {sys.executable} -c 'from freetf.training.checkpoint import "
             f"load_checkpoint; print(\"step\", load_checkpoint(\"{run}\")[0][\"step\"])'")
    assert code == 2, out
    assert "Traceback" not in out
    [line] = [x for x in out.splitlines() if x.startswith("freetf train:")]
    found = re.fullmatch(rf"freetf train: error: cannot write the checkpoint {run}/step_(\d+): "
                         rf"No space left on device; the last good checkpoint is "
                         rf"{run}/step_(\d+) \(continue from it with --resume \S+\)", line)
    assert found, line
    failed, good = int(found[1]), int(found[2])
    assert failed > good
    listing = after.split()
    assert [x for x in listing if x.startswith(("step_", ".step_"))] == [
        f"step_{s:06d}" for s in range(2, good + 1, 2)], after
    assert f"step {good}" in after  # the newest whole checkpoint, as the root resolves


@pytest.mark.heavy
def test_fsdp_workers_write_one_sharded_checkpoint_and_resume_from_it(tmp_path):
    """scaling.strategy=fsdp under Ray Train: each worker reports its own shards, Ray
    merges them into one checkpoint, a failed worker group resumes from it, and the
    result equals one worker at twice the batch."""
    cfg = cfg_for(tmp_path, "training.max_steps=4", "training.batch_size=4",
                  "scaling.num_workers=2", "scaling.strategy=fsdp", "checkpoint.every_steps=2",
                  "training.fail_at_step=3", "scaling.max_failures=1",
                  "tracking.mlflow.enabled=false", "scaling.run_name=fsdp")
    summary = run_training(cfg)
    assert summary.error is None, summary.error
    assert summary.checkpoint == tmp_path / "ray_results" / "fsdp" / "step_000004"
    shards = {p.name for p in (summary.checkpoint / "shards").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= shards
    one = train_loop(cfg_for(tmp_path / "one", "training.max_steps=4", "training.batch_size=8",
                             "tracking.mlflow.enabled=false", "scaling.use_ray=false"))
    fsdp_state, _ = load_checkpoint(summary.checkpoint)  # consolidated
    ref_state, _ = load_checkpoint(one.checkpoint)
    for key, ref in ref_state["model"].items():
        assert torch.allclose(fsdp_state["model"][key], ref, atol=2e-6), key
    assert len(fsdp_state["rng"]) == 2


def test_a_sqlite_store_is_refused_before_any_run_on_a_multi_host_cluster(tmp_path,
                                                                          monkeypatch):
    """Ray's nodes on two hosts (faked): the sqlite file is refused before the MLflow
    run is created; on one host (ray.cluster_utils.Cluster too) it is fine."""
    from freetf.tracking import TrackingError
    from freetf.training import ray_train

    assert len(ray_train.cluster_hosts()) == 1
    monkeypatch.setattr(ray_train, "cluster_hosts", lambda: {"10.0.0.1", "10.0.0.2"})
    with pytest.raises(TrackingError, match=r"spans 2 hosts .*mlflow server"):
        run_training(cfg_for(tmp_path, "training.max_steps=1", "scaling.run_name=hosts"))
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("preset, expected", [(None, "300"), ("42", "42")])
def test_a_local_ray_gives_worker_groups_time_to_start_on_a_loaded_machine(
        monkeypatch, preset, expected):
    """Ray Train's 60-s worker-group start-up timeout is raised for a local Ray (its
    processes inherit the environment), unless the user set it."""
    import freetf.training.ray_train as ray_train

    key = ray_train.WORKER_GROUP_START_TIMEOUT_ENV
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(key, raising=False)
    if preset is not None:
        monkeypatch.setenv(key, preset)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")  # restored by monkeypatch
    seen = {}
    monkeypatch.setattr(ray_train.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_train.ray, "init", lambda **kw: seen.update(os.environ))
    ray_train.init_ray(num_cpus=1)
    assert seen[key] == expected
