"""How much the leak onset differs between training runs: a fit to a sweep's trials.

Reads a sweep's trials table (``reports/<sweep>/verdicts.csv``, or the 30-trial default
run kept in ``docs/data/search_kl_p9_trials.csv``) and fits the free-generation
validity of every converged Free Transformer trial by the leak curve of the boundary
simulator (``tests/boundary_sim.py``):

    valid = B (1 - sigmoid(slope (x - x_l - e_seed - e_trial))),   x = log2(kappa)

with B the baselines' mean validity, the 256 free generations read as binomial counts,
``e_seed ~ N(0, tau_seed^2)`` shared by a seed's trials and ``e_trial ~ N(0,
tau_trial^2)`` each run's own, both integrated out (Gauss-Hermite).  For each (tau_seed,
tau_trial) on a grid it prints the best (x_l, slope) and the negative log-likelihood:
what the simulator's ``LEAK_SEED_SD``, ``LEAK_TRIAL_SD`` and ``VALID_SLOPE`` were set from
(docs/sweeps.md, Measured).

    python tools/leak_spread.py                             # the committed 30-trial run
    python tools/leak_spread.py reports/search_kl/verdicts.csv
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
from scipy import optimize, stats

ROOT = Path(__file__).resolve().parent.parent
DRAWS = 256
GRID = (0.0, 0.5, 1.0, 1.5)


def read_trials(path: Path) -> tuple[float, list[tuple[float, int, str]]]:
    """(the baselines' mean validity, [(x, valid count, seed)] of the converged probes)."""
    rows = list(csv.DictReader(path.open()))
    base = [float(r["eval/valid_rate"]) for r in rows if r["verdict"] == "baseline"]
    trials = [(math.log2(float(r["free_bits_bits"])),
               round(float(r["eval/valid_rate"]) * DRAWS), r["seed"])
              for r in rows if r["verdict"] not in ("baseline", "unconverged", "")
              and r["eval/valid_rate"]]
    if not base or not trials:
        raise SystemExit(f"{path}: no baselines or no judged trials with a validity")
    return float(np.mean(base)), trials


def neg_log_lik(trials, base: float, x_l: float, slope: float, tau_seed: float,
                tau_trial: float, nodes: int = 20) -> float:
    n, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    total = 0.0
    for seed in sorted({t[2] for t in trials}):
        lik = np.ones(nodes)  # per node of the seed's offset
        for x, k, _ in (t for t in trials if t[2] == seed):
            onset = x_l + tau_seed * n[:, None] + tau_trial * n[None, :]
            p = np.clip(base * (1 - 1 / (1 + np.exp(-slope * (x - onset)))), 1e-6, 1 - 1e-6)
            lik *= (stats.binom.pmf(k, DRAWS, p) * w[None, :]).sum(1)
        total -= math.log(max(float((lik * w).sum()), 1e-300))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", nargs="?", type=Path,
                        default=ROOT / "docs" / "data" / "search_kl_p9_trials.csv")
    args = parser.parse_args(argv)
    base, trials = read_trials(args.trials)
    print(f"{len(trials)} judged trials, {len({t[2] for t in trials})} seeds, "
          f"baselines' validity {base:.3f}")
    print("| tau_seed | tau_trial | x_l (log2 bits) | slope | -log lik |")
    print("|---|---|---|---|---|")
    for tau_seed in GRID:
        for tau_trial in GRID:
            fit = optimize.minimize(
                lambda q, s=tau_seed, t=tau_trial: neg_log_lik(trials, base, q[0],
                                                               math.exp(q[1]), s, t),
                [0.8, math.log(1.7)], method="Nelder-Mead")
            print(f"| {tau_seed:.1f} | {tau_trial:.1f} | {fit.x[0]:.2f} | "
                  f"{math.exp(fit.x[1]):.2f} | {fit.fun:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
