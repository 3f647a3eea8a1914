"""Tests for freetf.tracking.sinks' TensorBoard and W&B backends against recording writers
and runs: each call, the guide's metric names beside freetf's, and the missing extra named."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from freetf.config import load_config
from freetf.tracking.sinks import _TensorBoardSink, _WandbSink
from freetf.tracking.store import TrackingError

pytestmark = pytest.mark.timeout(60)


def _cfg(tmp_path: Path, **overrides):
    return load_config(overrides={"tracking.wandb.project": "proj", **overrides})


def test_tensorboard_writes_params_tags_text_figures_and_closes(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    sink = _TensorBoardSink(tmp_path / "tb")
    figure = object()
    sink.log_params({"a": "1", "b": "x"})
    sink.set_tags({"t": "v", "u": "w"})
    sink.log_text("hello", "notes.txt")
    sink.log_figure(figure, "curves.png")
    sink.log_metrics({"train/lr": 0.5, "x": 1.0}, step=3)
    sink.finish("FAILED")
    assert calls == [
        ("init", str(tmp_path / "tb")),
        ("add_text", ("params", "| param | value |\n|---|---|\n| a | 1 |\n| b | x |"), {}),
        ("add_text", ("tags", "t: v  \nu: w  "), {}),
        ("add_text", ("notes.txt", "hello"), {}),
        ("add_figure", ("curves.png", figure), {"close": False}),
        ("add_scalar", ("train/lr", 0.5, 3), {}),
        ("add_scalar", ("x", 1.0, 3), {}),
        ("add_scalar", ("Learning_Rate", 0.5, 3), {}),
        ("close", (), {}),
    ]


def test_wandb_gets_the_run_its_config_tags_files_and_exit_code(tmp_path, monkeypatch):
    calls = []

    class Run:
        config = types.SimpleNamespace(
            update=lambda *args, **kwargs: calls.append(("update", args, kwargs)))

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    def init(**kwargs):
        calls.append(("init", (), kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = _cfg(tmp_path, **{"tracking.wandb.mode": "disabled"})
    sink = _WandbSink(cfg, "trial", None, {"a": "1"})
    sink.log_params({"b": "2"})
    sink.set_tags({"t": "v"})
    sink.log_metrics({"train/loss": 2.0}, step=5)
    sink.log_artifact(tmp_path / "out" / "a.txt", "ignored")
    sink.finish("FINISHED")
    _WandbSink(cfg, None, "r1", {}).finish("KILLED")
    assert calls == [
        ("init", (), {"project": "proj", "mode": "disabled", "name": "trial", "id": None,
                      "resume": None, "config": {"a": "1"}}),
        ("update", ({"b": "2"},), {"allow_val_change": True}),
        ("update", ({"tags.t": "v"},), {"allow_val_change": True}),
        ("log", ({"train/loss": 2.0, "loss/total": 2.0},), {"step": 5}),
        ("save", (str(tmp_path / "out" / "a.txt"),),
         {"base_path": str(tmp_path / "out"), "policy": "now"}),
        ("finish", (), {"exit_code": 0}),
        ("init", (), {"project": "proj", "mode": "disabled", "name": None, "id": "r1",
                      "resume": "allow", "config": {}}),
        ("finish", (), {"exit_code": 1}),
    ]


@pytest.mark.parametrize("module, make, message", [
    ("torch.utils.tensorboard", lambda tmp_path: _TensorBoardSink(tmp_path),
     "tracking.tensorboard.enabled=true needs TensorBoard: pip install 'freetf[tensorboard]'"),
    ("wandb", lambda tmp_path: _WandbSink(_cfg(tmp_path), None, None, {}),
     "tracking.wandb.enabled=true needs wandb: pip install 'freetf[wandb]'")],
    ids=["tensorboard", "wandb"])
def test_a_backend_without_its_package_names_the_extra(module, make, message, tmp_path,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(TrackingError) as info:
        make(tmp_path)
    assert str(info.value) == message
    assert isinstance(info.value.__cause__, ImportError)
