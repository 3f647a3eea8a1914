"""Tests for freetf.sweeps.lock: one running sweep per name and storage folder.  The lock
itself between processes (a holder that exits, is stopped or is killed -9), the refusal
at the command line before Ray starts, and two real sweeps of one name started at once."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from freetf import files
from freetf.cli import main
from freetf.sweeps import lock
from freetf.sweeps import sweep as sweep_mod
from freetf.sweeps.lock import SweepRunning, lock_path, sweep_lock
from freetf.sweeps.spec import load_sweep

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
NAME = "race"
HOLDER = """
import sys
from freetf.sweeps.lock import sweep_lock
from freetf.sweeps.spec import load_sweep

with sweep_lock(load_sweep("search_kl_smoke", sys.argv[1:])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def settings(tmp: Path, *extra: str) -> list[str]:
    """The smoke sweep, named NAME, writing only under ``tmp``."""
    return [f"mlflow.sweep_name={NAME}", f"storage_path={tmp / 'ray_results'}",
            f"report_dir={tmp / 'reports'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            *extra]


def refused_line(holder: subprocess.Popen, tmp: Path) -> str:
    return (rf"sweep {NAME} is running \(pid {holder.pid} on host "
            rf"{re.escape(socket.gethostname())}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\): "
            rf"its folder {re.escape(str(tmp / 'ray_results' / NAME))}; wait for it, or give "
            rf"this one another --set mlflow.sweep_name=NEW_NAME")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of sweep NAME in ``tmp_path``; stop it after."""
    started = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, *settings(tmp_path)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("end", ["exit", "SIGTERM", "SIGKILL"])
def test_the_lock_refuses_a_second_holder_until_the_first_ends(tmp_path, holder, end):
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    first = holder()
    with pytest.raises(SweepRunning, match=f"^{refused_line(first, tmp_path)}$"):
        with sweep_lock(sweep):
            pytest.fail("a second sweep of the name took the lock")
    assert json.loads(lock_path(sweep).read_text())["pid"] == first.pid
    if end == "exit":
        first.communicate("\n", timeout=30)
    else:  # stopped, or killed without a chance to clean up: the kernel drops the lock
        first.send_signal(getattr(signal, end))
        first.wait(timeout=30)
    with sweep_lock(sweep):  # --resume, or the same sweep again, once the first has ended
        assert json.loads(lock_path(sweep).read_text())["pid"] == os.getpid()
    assert lock_path(sweep).read_text() == ""  # released: no holder recorded
    with pytest.raises(RuntimeError), sweep_lock(sweep):
        raise RuntimeError("the sweep failed")
    with sweep_lock(sweep):  # released by the exception
        pass


def test_one_process_cannot_hold_a_name_twice(tmp_path):
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    with sweep_lock(sweep), pytest.raises(SweepRunning, match=f"pid {os.getpid()} on host"):
        with sweep_lock(sweep):
            pass
    other = load_sweep("search_kl_smoke", settings(tmp_path, "mlflow.sweep_name=other"))
    with sweep_lock(sweep), sweep_lock(other):  # another name: its own lock
        pass


def test_no_lock_without_fcntl(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(files, "fcntl", None)
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    with caplog.at_level(logging.DEBUG, "freetf.sweeps.lock"), sweep_lock(sweep), \
            sweep_lock(sweep):
        pass
    assert "sweep race runs without its lock: no fcntl" in caplog.text


def test_no_lock_on_remote_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    remote = dataclasses.replace(sweep, storage_path="s3://bucket/ray_results")
    with sweep_lock(remote), sweep_lock(remote):
        pass
    assert list(tmp_path.iterdir()) == []  # no local s3:/bucket/ray_results/race.lock


@pytest.fixture
def no_sweep(monkeypatch):
    """Fail the test if the sweep starts Ray or its MLflow run."""
    def refuse(*args, **kwargs):
        raise AssertionError("the second sweep started")

    monkeypatch.setattr(sweep_mod, "_init_ray", refuse)
    monkeypatch.setattr("freetf.tracking.make_tracker", refuse)


@pytest.mark.parametrize("resume", [False, True])
def test_a_sweep_of_a_running_name_is_one_line_before_ray_starts(tmp_path, holder, no_sweep,
                                                                 capsys, resume):
    first = holder()
    argv = ["sweep", "--smoke", *(f"--set={s}" for s in settings(tmp_path))]
    assert main(argv + (["--resume"] if resume else [])) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"freetf sweep: error: {refused_line(first, tmp_path)}\n", err), err
    assert not (tmp_path / "mlflow.db").exists()  # not even the store was opened


def test_the_lock_is_beside_the_sweeps_folder_and_records_only_its_holder(tmp_path):
    deep = tmp_path / "new" / "deeper"  # a storage folder two levels new
    sweep = load_sweep("search_kl_smoke", settings(tmp_path, f"storage_path={deep}"))
    assert lock_path(sweep) == deep / f"{NAME}.lock"
    deep.mkdir(parents=True)
    lock_path(sweep).write_text("x" * 500)  # a killed holder's line, longer than ours
    with sweep_lock(sweep):
        holder = json.loads(lock_path(sweep).read_text())
        assert set(holder) == {"pid", "host", "since"}
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", holder["since"])
    assert lock_path(sweep).read_text() == ""


def test_the_lock_makes_a_storage_folder_two_levels_new(tmp_path):
    deep = tmp_path / "new" / "deeper"
    sweep = load_sweep("search_kl_smoke", settings(tmp_path, f"storage_path={deep}"))
    with sweep_lock(sweep):
        assert lock_path(sweep).is_file()
        with pytest.raises(SweepRunning):  # locked: not left unguarded
            with sweep_lock(sweep):
                pass


@pytest.mark.parametrize("line", ["", "{}", "[1]", '{"pid": 1'])
def test_a_holder_not_recorded_is_waited_for_then_said_so(tmp_path, monkeypatch, line):
    """A holder that has taken the lock but not written its line (or left a broken one):
    the refusal waits HOLDER_WAIT_S for it, then says the holder is not recorded."""
    monkeypatch.setattr(lock, "HOLDER_WAIT_S", 0.2)
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    path = lock_path(sweep)
    path.parent.mkdir(parents=True)
    fd = files.lock_file(path)
    try:
        os.write(fd, line.encode())
        start = time.monotonic()
        with pytest.raises(SweepRunning, match=(
                rf"^sweep {NAME} is running \(its holder is not recorded in "
                rf"{re.escape(str(path))}\): its folder ")):
            with sweep_lock(sweep):
                pytest.fail("a second sweep of the name took the lock")
        waited = time.monotonic() - start
    finally:
        os.close(fd)
    assert 0.2 <= waited < 1.0  # retried every 0.05 s until the wait was over


def test_a_holder_that_records_itself_while_the_refusal_waits_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HOLDER_WAIT_S", 30.0)
    sweep = load_sweep("search_kl_smoke", settings(tmp_path))
    path = lock_path(sweep)
    path.parent.mkdir(parents=True)
    fd = files.lock_file(path)
    line = json.dumps({"pid": 4242, "host": "elsewhere", "since": "then"}).encode()
    writer = threading.Timer(0.3, os.pwrite, (fd, line, 0))
    try:
        writer.start()
        start = time.monotonic()
        with pytest.raises(SweepRunning, match=r"is running \(pid 4242 on host elsewhere, "
                                               r"since then\): its folder"):
            with sweep_lock(sweep):
                pytest.fail("a second sweep of the name took the lock")
        assert time.monotonic() - start < 10  # named once written, not after the wait
    finally:
        writer.join()
        os.close(fd)


@pytest.mark.heavy  # two real sweeps started at once: about a minute on 2 cores
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_sweeps_of_one_name_at_once_run_one(tmp_path):
    """Before the lock both ran into one Tune folder and one MLflow experiment (two parent
    runs, every trial twice), or one died in MLflow's schema migration of a new store."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    one_trial = ["search.method=grid", "space.training.free_bits_bits={grid: [1.0]}",
                 "training.max_steps=5"]
    argv = [sys.executable, "-m", "freetf", "sweep", "--smoke",
            *(f"--set={s}" for s in settings(tmp_path, *one_trial))]
    sweeps = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=550) for proc in sweeps]
    done = [(proc.pid, proc.returncode, out, err)
            for proc, (out, err) in zip(sweeps, outputs, strict=True)]
    assert sorted(rc for _, rc, _, _ in done) == [0, 2], done
    (ran,) = [d for d in done if d[1] == 0]
    (refused,) = [d for d in done if d[1] == 2]
    assert re.fullmatch(f"freetf sweep: error: sweep {NAME} is running \\(pid {ran[0]} .*\n",
                        refused[3]), refused[3]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags.get("freetf.role") for r in runs) == ["sweep", "trial"]
    assert len(list((tmp_path / "ray_results" / NAME).glob("experiment_state-*.json"))) == 1
