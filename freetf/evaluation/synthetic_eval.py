"""The paper's Figure 4 protocol on the synthetic task (§4.1), as measured numbers.

With one prompt "<letter>>", sample G groups of N sequences twice: once with Z drawn
independently for every sequence, once with a single Z sequence (one code per position,
drawn from the prior) shared by the whole group.  What Z carries shows in how much a
shared Z makes the group agree:

- ``position_spread``: standard deviation of the target's start within a group (the
  window's start, also when noise replaced its first letter);
- ``noise_overlap``: mean pairwise Jaccard overlap of the "!" positions within a group;
- ``valid_rate``: sequences the task's generator can produce (``parse_synthetic``): the
  prompt's letter only, all in one 8-wide window (letters or "!" noise on them), no
  other letter, at length 66.  The task's own data is valid at rate 1.

Expected (paper): a shared Z shrinks the position spread at 1/8 and 1 bit and not at
1/64 bit; it raises the noise overlap only at 1 bit; the valid rate drops at 8 bits.
:func:`reproduces` turns each of the four rows into a test on one run's measurements.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from freetf.data.datasets import (
    SYNTHETIC_BODY_LEN,
    SYNTHETIC_SEQ_LEN,
    CharTokenizer,
    parse_synthetic,
)
from freetf.model.transformer import FreeTransformer


@dataclass(frozen=True)
class SequenceReading:
    valid: bool
    target_start: float | None  # body index of the target's start (parse_synthetic)
    noise: frozenset[int]  # body indices holding "!"


def read_sequence(text: str) -> SequenceReading:
    """Read a generated sequence with :func:`parse_synthetic`, the task's one definition
    of valid: noise on the target keeps it valid (as in the data)."""
    parsed = parse_synthetic(text)
    return SequenceReading(parsed.valid, parsed.target_start, frozenset(parsed.noise_positions))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass(frozen=True)
class GroupStats:
    position_spread: float
    noise_overlap: float
    valid_rate: float


def group_stats(texts: list[str]) -> GroupStats:
    readings = [read_sequence(t) for t in texts]
    starts = [r.target_start for r in readings if r.valid]
    spread = statistics.pstdev(starts) if len(starts) >= 2 else float("nan")
    pairs = list(itertools.combinations([r.noise for r in readings], 2))
    overlap = statistics.fmean(jaccard(a, b) for a, b in pairs) if pairs else float("nan")
    return GroupStats(spread, overlap, sum(r.valid for r in readings) / len(readings))


@torch.no_grad()
def sample_groups(model: FreeTransformer, letter: str, groups: int, per_group: int,
                  shared: bool, temperature: float = 1.0, seed: int = 0) -> list[list[str]]:
    """G groups of N decoded sequences for the prompt "<letter>>"."""
    tokenizer = CharTokenizer()
    device = next(model.parameters()).device
    model.eval()
    prompt = torch.tensor([tokenizer.encode(f"{letter}>")] * per_group, device=device)
    new = SYNTHETIC_SEQ_LEN - prompt.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    codes = 2 ** model.config.latent_dim
    out: list[list[str]] = []
    for _ in range(groups):
        shape = (1 if shared else per_group, SYNTHETIC_SEQ_LEN)
        z = torch.randint(0, codes, shape, generator=gen).to(device) if codes > 1 else None
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        rows = model.generate(prompt, new, temperature=temperature,
                              z=None if z is None else z.expand(per_group, -1))
        out.append([tokenizer.decode(r) for r in rows.tolist()])
    return out


def figure4_metrics(model: FreeTransformer, letter: str = "K", groups: int = 16,
                    per_group: int = 16, temperature: float = 1.0, seed: int = 0
                    ) -> dict[str, float]:
    """Mean group statistics with independent and with shared Z (see module docstring)."""
    result: dict[str, float] = {}
    for mode in ("independent", "shared"):
        batches = sample_groups(model, letter, groups, per_group, mode == "shared",
                                temperature, seed)
        stats = [group_stats(texts) for texts in batches]
        for key in asdict(stats[0]):
            values = [getattr(s, key) for s in stats if getattr(s, key) == getattr(s, key)]
            result[f"{mode}/{key}"] = statistics.fmean(values) if values else float("nan")
    return result


@torch.no_grad()
def free_generations(model: FreeTransformer, num: int, seed: int = 0,
                     temperature: float = 1.0) -> list[SequenceReading]:
    """``num`` free generations, read (:func:`read_sequence`).

    Free generation is the paper's setting: each sequence gets its own prompt
    "<letter>>" (letters drawn uniformly) and Z drawn from the uniform prior at every
    position, prompt included, so the encoder never sees the sequence.  A model that
    leaks (relies on a Z the prior cannot supply) breaks here first (§4.1: the valid
    rate drops at 8 bits).  The baseline (``latent_dim = 0``) is read the same way.
    """
    if num <= 0:
        raise ValueError(f"num={num} must be positive")
    tokenizer = CharTokenizer()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    letters = torch.randint(0, 26, (num,), generator=gen).tolist()
    prompt = torch.tensor([tokenizer.encode(f"{chr(ord('A') + i)}>") for i in letters],
                          device=device)  # (N, 2)
    codes = 2 ** model.config.latent_dim
    z = (torch.randint(0, codes, (num, SYNTHETIC_SEQ_LEN), generator=gen).to(device)
         if model.config.has_latent else None)  # (N, T) prior codes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = model.generate(prompt, SYNTHETIC_SEQ_LEN - prompt.shape[1],
                              temperature=temperature, z=z)
    model.train(was_training)
    return [read_sequence(tokenizer.decode(r)) for r in rows.tolist()]


def free_generation_validity(model: FreeTransformer, num: int, seed: int = 0,
                             temperature: float = 1.0) -> float:
    """Fraction of ``num`` free generations that are valid (:func:`free_generations`)."""
    return sum(r.valid for r in free_generations(model, num, seed, temperature)) / num


# The generator's own statistics: a start uniform on 0..56 (sd sqrt((57^2 - 1) / 12)) and
# "!" on each body position with probability 1/16.
TASK_START_SD = math.sqrt((57 ** 2 - 1) / 12)


def generation_stats(readings: list[SequenceReading]) -> dict[str, float]:
    """What free generations look like against the task's generator: ``eval/valid_rate``
    with its Wilson 95% interval (``eval/valid_low``, ``eval/valid_high``, over
    ``eval/valid_draws`` readings), and over the valid ones the target start's mean and
    standard deviation (``eval/gen_start_mean``, ``eval/gen_start_sd``; the task: 28 and
    16.45) and the share of body positions holding "!" (``eval/gen_noise_rate``; the task:
    1/16)."""
    valid = [r for r in readings if r.valid]
    starts = [r.target_start for r in valid if r.target_start is not None]
    body = SYNTHETIC_BODY_LEN * len(valid)
    from freetf.evaluation.latent_use import wilson_interval

    low, high = wilson_interval(len(valid), len(readings))
    out = {"eval/valid_rate": len(valid) / len(readings) if readings else math.nan,
           "eval/valid_low": low, "eval/valid_high": high,
           "eval/valid_draws": float(len(readings)),
           "eval/gen_start_mean": statistics.fmean(starts) if starts else math.nan,
           "eval/gen_start_sd": statistics.pstdev(starts) if len(starts) >= 2 else math.nan,
           "eval/gen_noise_rate": (sum(len(r.noise) for r in valid) / body
                                   if valid else math.nan)}
    return out


def render_groups(model: FreeTransformer, letter: str = "K", groups: int = 2,
                  per_group: int = 6, seed: int = 0) -> str:
    """Sample groups as text, shared Z then independent Z (the paper's Figure 4 view)."""
    lines = []
    for mode in ("shared", "independent"):
        for g, texts in enumerate(sample_groups(model, letter, groups, per_group,
                                                mode == "shared", seed=seed)):
            lines.append(f"-- {mode} Z, group {g + 1}")
            lines.extend(texts)
    return "\n".join(lines)


# The paper's four rows (§4.1, Figure 4): kappa in bits -> what Z carries.
FIGURE4_ROWS = {1 / 64: "nothing", 1 / 8: "position", 1.0: "position and noise",
                8.0: "broken generation"}
# Thresholds of the tests below: a shared Z "narrows" the target's position spread when
# shared / independent <= NARROWED (1/8 bit: <= STRONGLY_NARROWED), and "raises" the noise
# overlap when shared / independent >= RAISED; generation is "broken" below BROKEN_VALID.
NARROWED, STRONGLY_NARROWED, RAISED, BROKEN_VALID = 0.8, 0.5, 1.5, 0.2


def figure4_row(kappa_bits: float | None) -> str | None:
    """The paper's row for ``kappa_bits`` (one of its four kappas), else None."""
    if kappa_bits is None or kappa_bits <= 0:
        return None
    for kappa, row in FIGURE4_ROWS.items():
        if math.isclose(kappa_bits, kappa, rel_tol=1e-6):
            return row
    return None


def _ratio(m: Mapping[str, float], key: str) -> float:
    shared, independent = m.get(f"shared/{key}", math.nan), m.get(f"independent/{key}", math.nan)
    return shared / independent if independent and independent == independent else math.nan


def reproduces(kappa_bits: float | None, m: Mapping[str, float]) -> bool | None:
    """Whether one run's Figure 4 measurements ``m`` show its kappa's row (None: no row).

    - 1/64 bit, nothing: position spread shared / independent >= NARROWED (0.8);
    - 1/8 bit, position: spread ratio <= STRONGLY_NARROWED (0.5), and the noise overlap
      not raised (shared / independent < RAISED);
    - 1 bit, position and noise: spread ratio < NARROWED and overlap ratio >= RAISED (1.5);
    - 8 bits, broken generation: valid rate of generations with Z from the prior
      (``independent/valid_rate``) < BROKEN_VALID (0.2).
    A ratio that cannot be measured (NaN: no valid sequences) fails its test.
    """
    row = figure4_row(kappa_bits)
    spread, overlap = _ratio(m, "position_spread"), _ratio(m, "noise_overlap")
    if row == "nothing":
        return spread >= NARROWED
    if row == "position":
        return spread <= STRONGLY_NARROWED and overlap < RAISED
    if row == "position and noise":
        return spread < NARROWED and overlap >= RAISED
    if row == "broken generation":
        return m.get("independent/valid_rate", math.nan) < BROKEN_VALID
    return None
