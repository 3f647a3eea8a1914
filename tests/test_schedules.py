import math
from itertools import pairwise

import pytest
import torch

from freetf.config import (
    CurriculumPhase,
    FreeBitsScheduleConfig,
    KLAnnealingConfig,
    load_config,
)
from freetf.training.schedules import (
    build_lr_scheduler,
    curriculum_at,
    free_bits_at,
    kl_weight_at,
    load_lr_scheduler_state,
    lr_at,
    schedule_values,
)

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------- learning rate


def test_lr_warmup_cosine_endpoints_and_monotonic():
    lrs = [lr_at(s, 1e-3, 10, 100, 1e-5) for s in range(120)]
    assert lrs[0] < 1e-4  # starts near zero
    assert all(a < b for a, b in pairwise(lrs[:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in pairwise(lrs[10:101]))  # cosine falls
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2)  # half way down
    assert lrs[100:] == [1e-5] * 20  # flat at min_lr


def test_lr_constant_and_bad_kind():
    assert lr_at(0, 1.0, 4, 10, 0.0, "constant") == pytest.approx(0.2)
    assert [lr_at(s, 1.0, 4, 10, 0.0, "constant") for s in (4, 9, 50)] == [1.0] * 3
    with pytest.raises(ValueError, match="linear"):
        lr_at(0, 1.0, 4, 10, 0.0, "linear")


def test_build_lr_scheduler_follows_lr_at():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1},
                                 {"params": [params[1]], "lr": 0.01}])
    scheduler = build_lr_scheduler(optimizer, warmup_steps=3, total_steps=20, min_lr=1e-4)
    for step in range(25):
        for group, base in zip(optimizer.param_groups, (0.1, 0.01), strict=True):
            assert group["lr"] == pytest.approx(lr_at(step, base, 3, 20, 1e-4))
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- KL weight


def test_kl_constant_and_linear():
    assert kl_weight_at(5, 100, 0.3, KLAnnealingConfig()) == 0.3
    linear = KLAnnealingConfig(type="linear", initial_weight=1.0, warmup_steps=0)
    # the guide's get_kl_weight(step, total, 1.0, 0.1)
    assert kl_weight_at(0, 100, 0.1, linear) == pytest.approx(1.0)
    assert kl_weight_at(25, 100, 0.1, linear) == pytest.approx(1.0 * 0.75 + 0.1 * 0.25)
    assert kl_weight_at(100, 100, 0.1, linear) == pytest.approx(0.1)
    assert kl_weight_at(500, 100, 0.1, linear) == pytest.approx(0.1)
    warm = KLAnnealingConfig(type="linear", initial_weight=0.0, warmup_steps=10)
    assert kl_weight_at(5, 100, 2.0, warm) == pytest.approx(1.0)
    assert kl_weight_at(10, 100, 2.0, warm) == kl_weight_at(90, 100, 2.0, warm) == 2.0


def test_kl_cosine_monotonic_with_flat_ends():
    cfg = KLAnnealingConfig(type="cosine", initial_weight=0.0, warmup_steps=40)
    values = [kl_weight_at(s, 100, 1.0, cfg) for s in range(60)]
    assert values[0] == 0.0 and values[40] == pytest.approx(1.0) and values[59] == 1.0
    assert values[20] == pytest.approx(0.5)
    assert all(a <= b for a, b in pairwise(values))
    assert values[1] - values[0] < values[21] - values[20]  # slow start (half cosine)
    linear = KLAnnealingConfig(type="linear", initial_weight=0.0, warmup_steps=40)
    assert values[5] < kl_weight_at(5, 100, 1.0, linear)


def test_kl_cyclical_period_and_shape():
    cfg = KLAnnealingConfig(type="cyclical", initial_weight=0.0, cycles=4, ratio=0.5)
    total = 100  # period 25, ramp over the first 12.5 steps
    values = [kl_weight_at(s, total, 1.0, cfg) for s in range(total)]
    assert values[0] == 0.0 and values[25] == 0.0 and values[75] == 0.0
    for s in range(75):
        assert values[s] == pytest.approx(values[s + 25])
    assert all(a < b for a, b in pairwise(values[:13]))  # ramp up
    assert values[13:25] == [1.0] * 12  # hold
    assert values[6] == pytest.approx(6 / 12.5)
    assert kl_weight_at(total, total, 1.0, cfg) == 1.0


# ----------------------------------------------------------------------------- free bits


def test_free_bits_schedules():
    final = math.log(2) / 2
    assert free_bits_at(3, 10, final, FreeBitsScheduleConfig()) == final
    none_start = FreeBitsScheduleConfig(type="linear", initial_free_bits=None)
    assert free_bits_at(3, 10, final, none_start) == final
    linear = FreeBitsScheduleConfig(type="linear", initial_free_bits=2.0, steps=0)
    # the guide's get_free_bits(step, total, 2.0, 0.5)
    assert free_bits_at(0, 100, 0.5, linear) == 2.0
    assert free_bits_at(40, 100, 0.5, linear) == pytest.approx(2.0 * 0.6 + 0.5 * 0.4)
    assert free_bits_at(100, 100, 0.5, linear) == free_bits_at(300, 100, 0.5, linear) == 0.5
    cosine = FreeBitsScheduleConfig(type="cosine", initial_free_bits=2.0, steps=20)
    values = [free_bits_at(s, 100, 0.5, cosine) for s in range(30)]
    assert all(a >= b for a, b in pairwise(values))
    assert values[10] == pytest.approx(1.25) and values[20:] == [0.5] * 10


# ----------------------------------------------------------------------------- curriculum


def test_curriculum_phase_lookup():
    phases = [CurriculumPhase(until_step=10, max_seq_len=16, kl_weight=1.0),
              CurriculumPhase(until_step=30, kl_weight=0.5)]
    assert curriculum_at(0, phases) is phases[0]
    assert curriculum_at(9, phases) is phases[0]
    assert curriculum_at(10, phases) is phases[1]
    assert curriculum_at(29, phases) is phases[1]
    assert curriculum_at(30, phases) is None
    assert curriculum_at(0, []) is None


def test_schedule_values_combines():
    cfg = load_config(overrides={
        "training.kl_weight": 0.1,
        "training.free_bits": 0.4,
        "training.kl_annealing": {"type": "linear", "initial_weight": 0.0,
                                  "warmup_steps": 20},
        "training.curriculum": [{"until_step": 10, "max_seq_len": 33, "kl_weight": 1.0},
                                {"until_step": 40, "kl_weight": 0.5}],
    })
    assert schedule_values(cfg, 5, 100) == {
        "kl_weight": pytest.approx(0.25), "free_bits_nats": 0.4, "max_seq_len": 33}
    at_20 = schedule_values(cfg, 20, 100)
    assert at_20["kl_weight"] == pytest.approx(0.5) and at_20["max_seq_len"] == 66
    assert schedule_values(cfg, 60, 100)["kl_weight"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- edges


def test_a_bad_schedule_type_is_named():
    with pytest.raises(ValueError) as err:
        lr_at(0, 1.0, 4, 10, 0.0, "linear")
    assert str(err.value) == "scheduler type 'linear' must be 'cosine' or 'constant'"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="scheduler type 'step'"):
        build_lr_scheduler(optimizer, 0, 10, 0.0, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as err:
        kl_weight_at(0, 10, 1.0, KLAnnealingConfig(type="step"))  # type: ignore[arg-type]
    assert str(err.value) == "training.kl_annealing.type='step' is not supported"
    bogus = FreeBitsScheduleConfig(type="step", initial_free_bits=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as err:
        free_bits_at(0, 10, 0.5, bogus)
    assert str(err.value) == "training.free_bits_schedule.type='step' is not supported"
    no_start = FreeBitsScheduleConfig(type="step")  # type: ignore[arg-type]
    assert free_bits_at(0, 10, 0.5, no_start) == 0.5  # no start: no ramp, whatever the type


def test_ramps_before_the_first_step_and_without_steps():
    linear = KLAnnealingConfig(type="linear", initial_weight=0.5, warmup_steps=10)
    assert kl_weight_at(-5, 100, 1.0, linear) == 0.5  # progress clamped at 0
    assert kl_weight_at(10, 100, 1.0, linear) == 1.0
    no_steps = KLAnnealingConfig(type="linear", initial_weight=0.5, warmup_steps=0)
    assert kl_weight_at(0, 0, 1.0, no_steps) == 1.0  # nothing to ramp over: the end value
    assert kl_weight_at(0, -3, 1.0, no_steps) == 1.0
    cosine = FreeBitsScheduleConfig(type="cosine", initial_free_bits=2.0, steps=0)
    assert free_bits_at(0, 8, 0.5, cosine) == 2.0
    assert free_bits_at(2, 8, 0.5, cosine) == pytest.approx(0.5 + 1.5 * (0.5 + 0.5 * math.cos(
        math.pi / 4)))
    assert free_bits_at(8, 8, 0.5, cosine) == 0.5


def test_cyclical_without_steps_and_with_a_whole_cycle_ramp():
    cfg = KLAnnealingConfig(type="cyclical", initial_weight=0.2, cycles=2, ratio=1.0)
    assert kl_weight_at(0, 0, 1.0, cfg) == 1.0
    # 10 steps, 2 cycles of 5: the ramp takes each whole cycle
    assert [kl_weight_at(s, 10, 1.0, cfg) for s in range(11)] == pytest.approx(
        [0.2, 0.36, 0.52, 0.68, 0.84] * 2 + [1.0])
    odd = KLAnnealingConfig(type="cyclical", initial_weight=0.0, cycles=3, ratio=0.5)
    # ceil(10 / 3) = 4 steps a cycle, ramp over the first 2
    assert [kl_weight_at(s, 10, 1.0, odd) for s in range(10)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.0] * 2 + [0.0, 0.5])


def test_scheduler_takes_each_groups_initial_lr_the_kind_and_a_zero_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.5, "initial_lr": 0.1},
                                 {"params": [params[1]], "lr": 0.2},
                                 {"params": [params[2]], "lr": 0.0}])
    scheduler = build_lr_scheduler(optimizer, warmup_steps=1, total_steps=4, min_lr=0.01,
                                   kind="constant")
    lrs = []
    for _ in range(5):
        lrs.extend(group["lr"] for group in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.0] + [0.1, 0.2, 0.0] * 4)


def test_a_restored_step_count_follows_this_runs_schedule():
    """A resume with another total_steps: the learning rates of the saved step under the
    new schedule, not the saved run's last ones."""
    param = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.SGD([param], lr=1.0)
    old_scheduler = build_lr_scheduler(old, 2, 10, 0.0)
    for _ in range(6):
        old.step()
        old_scheduler.step()
    state = old_scheduler.state_dict()
    new = torch.optim.SGD([param], lr=1.0)
    new.load_state_dict(old.state_dict())  # the saved run's lr (and initial_lr)
    scheduler = build_lr_scheduler(new, 2, 20, 0.0)
    load_lr_scheduler_state(scheduler, state)
    assert scheduler.last_epoch == 6
    assert new.param_groups[0]["lr"] == pytest.approx(lr_at(6, 1.0, 2, 20, 0.0))
    assert new.param_groups[0]["lr"] != pytest.approx(lr_at(6, 1.0, 2, 10, 0.0))


def test_one_step_ramps_and_one_step_cycles():
    one = KLAnnealingConfig(type="linear", initial_weight=0.2, warmup_steps=1)
    assert [kl_weight_at(s, 10, 1.0, one) for s in (0, 1)] == [0.2, 1.0]
    cyclical = KLAnnealingConfig(type="cyclical", initial_weight=0.2, cycles=1, ratio=0.5)
    assert kl_weight_at(0, 1, 1.0, cyclical) == 0.2  # a run of one step: one cycle
    assert kl_weight_at(-1, 0, 1.0, cyclical) == 1.0  # no steps: the end value
    constant = FreeBitsScheduleConfig(type="constant", initial_free_bits=2.0, steps=10)
    assert free_bits_at(0, 10, 0.5, constant) == 0.5  # a start without a ramp is unused


def test_build_lr_scheduler_checks_the_kind_even_at_a_zero_lr_and_without_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match="scheduler type 'step'"):
        build_lr_scheduler(optimizer, 2, 10, 0.0, "step")  # type: ignore[arg-type]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=0, total_steps=4, min_lr=0.0)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                 0.5 - 0.5 * math.cos(math.pi / 4), 0.0])


def test_schedule_values_ramp_over_the_whole_run_when_no_steps_are_given():
    cfg = load_config(overrides={
        "training.kl_weight": 0.4, "training.free_bits": 0.5,
        "training.kl_annealing": {"type": "linear", "initial_weight": 0.0, "warmup_steps": 0},
        "training.free_bits_schedule": {"type": "linear", "initial_free_bits": 2.0,
                                        "steps": 0}})
    assert schedule_values(cfg, 25, 100) == {"kl_weight": pytest.approx(0.1),
                                             "free_bits_nats": pytest.approx(1.625),
                                             "max_seq_len": 66}


def test_a_restored_groups_floor_is_min_lr_from_its_initial_lr():
    """The factor is taken from the group's initial_lr: at the end the learning rate is
    min_lr, not min_lr scaled by the restored lr."""
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))],
                                  "lr": 0.5, "initial_lr": 0.1}])
    scheduler = build_lr_scheduler(optimizer, warmup_steps=0, total_steps=2, min_lr=0.01)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_run_that_ends_with_its_warmup_is_at_min_lr_from_then():
    assert lr_at(3, 1.0, 4, 4, 0.1) == pytest.approx(0.8)
    assert lr_at(4, 1.0, 4, 4, 0.1) == 0.1
