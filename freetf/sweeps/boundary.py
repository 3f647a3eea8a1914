"""The ``boundary`` search: where along kappa does Z collapse, and where does it leak?

A Ray Tune :class:`~ray.tune.search.Searcher` (so Tune keeps its concurrency limit,
resume and the sweep's MLflow child runs).  For every *setting* (one value of each other
searched key: ``kl_weight``, the annealing type, ...) it probes x = log2(kappa):

1. the baselines first: one ``model.latent_dim = 0`` trial per seed and per value of the
   searched keys that change a model without latent (not kappa, not ``kl_weight``);
2. ``boundary.initial`` probes spread evenly over the range (or at the values of
   ``boundary.at``, a ladder), each run with every seed;
3. then, one probe at a time per setting until ``boundary.probes`` are placed: the x on
   a 1/8-log2 grid where one more verdict tells the most about the two boundaries (the
   sum of the expected information gains of
   :func:`freetf.evaluation.verdicts.probe_information` for the collapse onset kappa_c
   and the leak onset kappa_l, or for the ``boundary.targets`` given, which on the
   synthetic task may add the regime onsets kappa_pos, kappa_noise and kappa_broken),
   skipping points within a quarter log2 unit of a probe already placed.  A probe is
   placed as soon as a slot frees, from the verdicts in so far, so Tune's concurrency is
   kept.

The verdicts (collapsed / used / leaking) are those of :mod:`freetf.evaluation.verdicts`,
against each trial's baseline of the same seed, fitted with the seed's own offset shared
by its trials (every probe runs the same seeds); a probe waits for the baselines.  Each trial's
config holds the searched keys plus ``training.seed`` and ``model.latent_dim``
(:func:`trial_keys`), so every trial has its own key and MLflow run.
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import Outcome
from freetf.results.columns import log2_range  # noqa: F401 - the public API

log = logging.getLogger(__name__)

SEED_KEY, LATENT_KEY = "training.seed", "model.latent_dim"
PROBE_STEP_LOG2 = 0.125  # new probes sit on this grid of log2(kappa)
MIN_SPACING_LOG2 = 0.25  # ... at least this far from a probe already placed


def trial_keys(space_keys: tuple[str, ...]) -> tuple[str, ...]:
    """The config keys of a boundary trial: the searched keys, the seed, the latent size."""
    return (*space_keys, SEED_KEY, LATENT_KEY)


class BoundarySearch(Searcher):
    """Probe ``key`` (kappa) in ``[2^low_log2, 2^high_log2]`` per setting (module docstring).

    ``settings``: one dict per combination of the other searched keys' values;
    ``base_values``: the base config's value of every searched key (a baseline's
    latent-only keys take them); ``latent_dim``: the Free Transformer's H.
    """

    def __init__(self, key: str, low_log2: float, high_log2: float,
                 settings: list[dict[str, Any]], base_values: dict[str, Any], latent_dim: int,
                 seeds: list[int], probes: int, initial: int,
                 tolerances: verdicts.Tolerances | None = None, metric: str | None = None,
                 mode: str | None = None, targets: tuple[str, ...] = verdicts.KINDS,
                 at: tuple[float, ...] = ()):
        super().__init__(metric=metric, mode=mode)
        if not low_log2 < high_log2:
            raise ValueError(f"empty kappa range [2^{low_log2}, 2^{high_log2}]")
        if at:
            initial = len(at)
        if not 2 <= initial <= probes:
            raise ValueError(f"need 2 <= initial={initial} <= probes={probes}")
        if len(seeds) < 2:
            raise ValueError(f"{len(seeds)} seed(s): a boundary needs >= 2 seeds per probe")
        self.key, self.low, self.high = key, float(low_log2), float(high_log2)
        self.settings = [dict(s) for s in settings] or [{}]
        self.base_values, self.latent_dim = dict(base_values), int(latent_dim)
        self.seeds, self.probes = list(seeds), probes
        self.tolerances = tolerances or verdicts.Tolerances()
        self.targets = tuple(targets)
        self.queue: list[dict[str, Any]] = []  # trial specs waiting for a slot
        self.live: dict[str, dict[str, Any]] = {}  # trial_id -> spec
        self.done: list[tuple[dict[str, Any], Outcome | None]] = []  # (spec, None: failed)
        self.placed: list[list[float]] = [[] for _ in self.settings]  # x per setting
        for setting in self.settings:
            if setting.get(key) is not None:
                raise ValueError(f"the boundary key {key} is not a setting")
        for baseline in self._baseline_settings():
            self.queue += [{"role": "baseline", "setting": baseline, "seed": s}
                           for s in self.seeds]
        starts = ([math.log2(v) for v in at] if at
                  else np.linspace(self.low, self.high, initial))
        for x, index in itertools.product(starts, range(len(self.settings))):
            self._place(index, float(x))

    @property
    def budget(self) -> int:
        """Trials this search runs in all (Tune's ``num_samples``)."""
        baselines = len(self._baseline_settings()) * len(self.seeds)
        return baselines + len(self.settings) * self.probes * len(self.seeds)

    # ------------------------------------------------------------------ Tune's interface

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.queue:
            self._plan()
        if not self.queue:
            return Searcher.FINISHED if self._all_placed() and not self.live else None
        spec = self.queue.pop(0)
        self.live[trial_id] = spec
        return self.config(spec)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        spec = self.live.pop(trial_id, None)
        if spec is None:
            return
        ok = not error and result and result.get("eval/ce_prior_nats") is not None
        self.done.append((spec, Outcome.from_metrics(result) if ok else None))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # ------------------------------------------------------------------ trials

    def config(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The Tune config of a trial spec (the keys of :func:`trial_keys`)."""
        if spec["role"] == "baseline":
            values = {**self.base_values, **spec["setting"], LATENT_KEY: 0}
        else:
            values = {**self.settings[spec["index"]], self.key: kappa_bits(spec["x"]),
                      LATENT_KEY: self.latent_dim}
        return {**values, SEED_KEY: spec["seed"]}

    def _baseline_settings(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        for setting in self.settings:
            own = {k: v for k, v in setting.items() if verdicts.changes_baseline(k)}
            if own not in seen:
                seen.append(own)
        return seen

    def _baseline_of(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.settings[index].items() if verdicts.changes_baseline(k)}

    def _place(self, index: int, x: float) -> None:
        self.placed[index].append(x)
        self.queue += [{"role": "probe", "index": index, "x": x, "seed": s}
                       for s in self.seeds]

    def _all_placed(self) -> bool:
        return all(len(p) >= self.probes for p in self.placed)

    # ------------------------------------------------------------------ verdicts, probes

    def _baselines_in(self) -> bool:
        """Every baseline setting has at least one finished baseline."""
        return all(any(o is not None and spec["role"] == "baseline" and spec["setting"] == b
                       for spec, o in self.done) for b in self._baseline_settings())

    def observations(self, index: int) -> tuple[list[float], list[str], list[int]]:
        """(x, verdict, seed) of the finished probes of setting ``index`` (with a baseline)."""
        baselines = {spec["seed"]: o for spec, o in self.done if o is not None
                     and spec["role"] == "baseline" and spec["setting"] == self._baseline_of(index)}
        xs, labels, seeds = [], [], []
        for spec, outcome in self.done:
            if (spec["role"] == "probe" and spec["index"] == index and outcome is not None
                    and spec["seed"] in baselines):
                label = verdicts.classify(outcome, baselines[spec["seed"]], self.tolerances)
                if label != verdicts.UNCONVERGED:
                    xs.append(spec["x"])
                    labels.append(label)
                    seeds.append(spec["seed"])
        return xs, labels, seeds

    def fits(self, index: int, confidence: float = 0.9) -> dict[str, verdicts.BoundaryFit]:
        """The collapse and leak boundaries of setting ``index`` from the verdicts so far."""
        xs, labels, seeds = self.observations(index)
        return {kind: verdicts.fit_boundary(kind, xs, [v == _VERDICT[kind] for v in labels],
                                            self.low, self.high, confidence, groups=seeds)
                for kind in verdicts.KINDS}

    def _target(self, index: int, kind: str) -> tuple[list[float], list[bool], list[int]]:
        """(x, y, seed) for the ``kind`` boundary: y is the verdict for kappa_c / kappa_l,
        whether the trial's regime reaches ``kind`` for a regime onset (trials with one)."""
        if kind in _VERDICT:
            xs, labels, seeds = self.observations(index)
            return xs, [v == _VERDICT[kind] for v in labels], seeds
        xs, regimes, seeds = self.regimes(index)
        return xs, verdicts.reaches(kind, regimes), seeds

    def regimes(self, index: int) -> tuple[list[float], list[str], list[int]]:
        """(x, regime, seed) of the converged probes of setting ``index`` with a regime."""
        rows = [(spec["x"], verdicts.regime(outcome, self.tolerances), spec["seed"])
                for spec, outcome in self.done
                if spec["role"] == "probe" and spec["index"] == index and outcome is not None
                and outcome.converged != 0.0]
        rows = [r for r in rows if r[1]]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def _plan(self) -> None:
        """Place the next probe of the setting with the fewest, once the baselines are in."""
        waiting = [i for i in range(len(self.settings)) if len(self.placed[i]) < self.probes]
        baselines_live = any(s["role"] == "baseline" for s in self.live.values())
        if not waiting or baselines_live or not self._baselines_in():
            return
        index = min(waiting, key=lambda i: len(self.placed[i]))
        self._place(index, self.next_probe(index))

    def next_probe(self, index: int) -> float:
        """The x (log2 kappa) where one more verdict is worth the most (module docstring)."""
        grid = np.arange(self.low, self.high + 1e-9, PROBE_STEP_LOG2)
        taken = np.asarray(self.placed[index])
        free = grid[np.abs(grid[:, None] - taken[None, :]).min(1) >= MIN_SPACING_LOG2 - 1e-9] \
            if taken.size else grid
        candidates = free if free.size else grid
        gain = 0.0
        for kind in self.targets:
            xs, ys, seeds = self._target(index, kind)
            gain = gain + verdicts.probe_information(kind, candidates, xs, ys, self.low,
                                                     self.high, groups=seeds)
        x = float(candidates[int(np.argmax(gain))])
        log.info("boundary search: next probe of setting %s at kappa = %.4g bits",
                 self.settings[index], kappa_bits(x))
        return x


_VERDICT = {"collapse": "collapsed", "leak": "leaking"}


def kappa_bits(x: float) -> float:
    """kappa in bits of x = log2(kappa), rounded to 6 significant digits (stable keys)."""
    return float(f"{2.0 ** x:.6g}")


def from_sweep(sweep, base) -> BoundarySearch:
    """The search of a ``search.method: boundary`` sweep spec on its base config."""
    from freetf.config import flatten

    spec = sweep.boundary
    low, high = log2_range(next(d.values for d in sweep.space if d.key == spec.key))
    flat = flatten(base.to_dict())
    return BoundarySearch(
        spec.key, low, high, sweep.settings, {d.key: flat[d.key] for d in sweep.space},
        base.model.latent_dim, seeds(sweep), spec.probes, spec.initial,
        verdicts.Tolerances.from_config(base.diagnostics),
        metric=sweep.search.metric, mode=sweep.search.mode, targets=tuple(spec.targets),
        at=tuple(float(v) for v in spec.at))


def seeds(sweep) -> list[int]:
    """The training seeds of a boundary sweep: ``boundary.seeds`` of them from
    ``search.seed * boundary.seeds`` on (another search seed: independent replicates)."""
    n = sweep.boundary.seeds
    return list(range(sweep.search.seed * n, sweep.search.seed * n + n))
