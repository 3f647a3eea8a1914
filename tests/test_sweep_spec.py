"""The sweep spec (freetf/sweeps/spec.py): each check's whole message, the properties a
sweep derives from its spec, and the spec written back out; no Ray instance is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from freetf.sweeps.spec import Dimension, SweepError, load_sweep

pytestmark = pytest.mark.timeout(60)

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"
SMOKE = CONFIGS / "search_kl_smoke.yaml"  # a boundary search of 6 trials over tiny.yaml
RANDOM = ["search.method=random", "space.training.free_bits_bits={grid: [0.015625, 1.0]}"]


def _error(settings: list[str], path: Path | None = SMOKE) -> str:
    with pytest.raises(SweepError) as err:
        load_sweep(path, settings)
    return str(err.value)



@pytest.mark.parametrize("text, values", [
    ("[1e-3, 1e-1]", (0.001, 0.1)),  # both strings: "1e-3" > "1e-1" as strings
    ("[1e-3, 1.0]", (0.001, 1.0)),  # a string and a float: not comparable
    ("[0.25, 2e0]", (0.25, 2.0)),
])
def test_a_range_yaml_reads_as_strings_is_compared_as_numbers(text, values):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; the range is still a range."""
    sweep = load_sweep(SMOKE, [*RANDOM, f"space.training.kl_weight={{loguniform: {text}}}"])
    assert sweep.space[-1] == Dimension("training.kl_weight", "loguniform", values)
    assert _error([*RANDOM, "space.training.kl_weight={uniform: [2e0, 1e-1]}"]) == (
        "space.training.kl_weight.uniform=['2e0', '1e-1'] must be [low, high] with low < high")
    assert _error([*RANDOM, "space.training.kl_weight={loguniform: [0e0, 1e-1]}"]) == (
        "space.training.kl_weight.loguniform=['0e0', '1e-1'] needs low > 0")
