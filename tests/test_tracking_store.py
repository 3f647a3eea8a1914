"""Tests for freetf.tracking.store's schema lock: processes that open one new sqlite store
at once (two sweeps, or a sweep's trials, on a new mlflow.db) all get a working store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from freetf import files
from freetf.tracking import mlflow_client

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
# Reads a store URI per line, opens it and answers "ok" or the error.  The imports come
# first, so that the processes open the store at the same moment.
OPENER = """
import sys
from freetf.tracking import mlflow_client, preload_store_modules
from freetf.tracking.store import root_cause

preload_store_modules()
print("ready", flush=True)
for line in sys.stdin:
    try:
        mlflow_client(line.strip()).search_experiments()
        print("ok", flush=True)
    except Exception as err:
        print(root_cause(err), flush=True)
"""
PROCESSES, ROUNDS = 3, 2  # without the lock, every round on 2 cores broke a process
# (`duplicate column name: step`, `table alembic_version already exists`)


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    openers = [subprocess.Popen([sys.executable, "-c", OPENER], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for _ in range(PROCESSES)]
    try:
        assert [p.stdout.readline() for p in openers] == ["ready\n"] * PROCESSES
        answers = []
        for round_ in range(ROUNDS):
            uri = f"sqlite:///{tmp_path / str(round_) / 'mlflow.db'}\n"
            for p in openers:
                p.stdin.write(uri)
                p.stdin.flush()
            answers.append([p.stdout.readline().strip() for p in openers])
    finally:
        for p in openers:
            p.stdin.close()
            p.wait(timeout=60)
    assert answers == [["ok"] * PROCESSES] * ROUNDS
    for round_ in range(ROUNDS):
        assert (tmp_path / str(round_) / "mlflow.db.lock").is_file()


def test_a_store_opens_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "fcntl", None)
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_experiments()
    assert not (tmp_path / "mlflow.db.lock").exists()
