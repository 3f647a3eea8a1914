"""freetf.training.context: the log window's means and the in-process runner's answers
(the loop's tests reach them through whole runs; these pin each one)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from freetf import load_config
from freetf.config import ConfigError
from freetf.training import context as context_module
from freetf.training.context import LogWindow, TrainContext

pytestmark = pytest.mark.timeout(60)


def test_the_window_means_count_finite_values_only():
    window = LogWindow()
    assert (window.keys, window.sums, window.counts) == ([], None, None)
    assert window.means() == {}
    window.add({"loss": torch.tensor(2.0), "kl": torch.tensor(float("nan")),
                "norm": torch.tensor(float("inf"))})
    window.add({"loss": torch.tensor(4.0), "kl": torch.tensor(1.0),
                "norm": torch.tensor(-float("inf"))})
    window.add({"loss": torch.tensor(9.0), "kl": torch.tensor(3.0),
                "norm": torch.tensor(float("nan"))})
    means = window.means()
    assert list(means) == ["loss", "kl", "norm"]
    assert means["loss"] == 5.0 and means["kl"] == 2.0
    assert math.isnan(means["norm"])  # no finite value in the window


def test_the_defaults_are_one_worker_in_process(tmp_path):
    ctx = TrainContext()
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.resume_from) == (0, 1, None, None)
    assert ctx.history == [] and ctx.marks == {} and ctx.total_steps is None
    assert ctx.checkpoint_at_nonfinite_stop is False and ctx.listener is None
    assert ctx.is_main and not TrainContext(rank=1, world_size=2).is_main
    assert TrainContext().history is not ctx.history  # a list of its own
    assert ctx.latest_checkpoint() is None
    assert TrainContext(resume_from=str(tmp_path)).latest_checkpoint() == tmp_path


def test_marks_are_wall_clock_times_reported_as_the_timeline():
    ctx = TrainContext()
    before = time.time()
    ctx.mark("start")
    ctx.mark("first_step")
    assert before <= ctx.marks["start"] <= ctx.marks["first_step"] <= time.time()
    assert ctx.timeline() == {"timeline/start": ctx.marks["start"],
                              "timeline/first_step": ctx.marks["first_step"]}


@pytest.mark.parametrize("setting, cuda, expected", [
    ("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"),
    ("cuda", False, "cuda")])
def test_the_device_follows_training_device_and_cuda(setting, cuda, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config("freetf/configs/tiny.yaml", [f"training.device={setting}"])
    assert TrainContext().resolve_device(cfg) == torch.device(expected)
    given = torch.device("meta")
    assert TrainContext(device=given).resolve_device(cfg) is given


def test_one_worker_shards_nothing_and_refuses_fsdp():
    model = torch.nn.Linear(2, 2)
    cfg = load_config("freetf/configs/tiny.yaml")
    ctx = TrainContext()
    assert ctx.shard_model(model, cfg) is model and ctx.prepare_model(model) is model
    fsdp = cfg.replace(["scaling.strategy=fsdp"])
    with pytest.raises(ConfigError) as raised:
        ctx.shard_model(model, fsdp)
    assert str(raised.value) == (
        "scaling.strategy='fsdp' needs a process group: run it with Ray Train workers "
        "(in a sweep: resources.trial_runner=train)")


def test_collectives_of_one_worker_are_its_own_values():
    ctx, value = TrainContext(), {"a": 1}
    assert ctx.all_gather(value) == [value] and ctx.all_gather(value)[0] is value
    assert ctx.from_main(value) is value


@pytest.mark.parametrize("sync_point", [True, False])
def test_a_stop_is_the_requested_signal_at_any_step(sync_point, monkeypatch):
    monkeypatch.setattr(context_module, "requested_signal", lambda: 15)
    assert TrainContext().requested_stop(sync_point) == 15
    monkeypatch.setattr(context_module, "requested_signal", lambda: None)
    assert TrainContext().requested_stop(sync_point) is None


def test_reports_are_kept_as_copies_and_heard_with_the_total_steps(tmp_path):
    heard = []
    ctx = TrainContext(listener=lambda metrics, total: heard.append((metrics, total)))
    ctx.total_steps = 40
    metrics = {"step": 3, "train/loss": 1.5}
    ctx.report(metrics, tmp_path, essential=False)
    metrics["step"] = 99  # the caller's dict changes afterwards
    assert ctx.history == [{"step": 3, "train/loss": 1.5}]
    assert heard == [(metrics, 40)] and heard[0][0] is metrics
    TrainContext().report({"step": 1})  # no listener


def test_the_checkpoint_root_is_the_configs_folder_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).parent.parent / "freetf/configs/tiny.yaml",
                      ["checkpoint.dir=ckpts/run"])
    assert TrainContext().checkpoint_root(cfg) == tmp_path.resolve() / "ckpts" / "run"
