"""Coverage and width of the boundary search's intervals for a given budget, on the
simulated sweep of tests/boundary_sim.py (no training; seconds).

    python tools/boundary_budget.py                 # the default: 3 seeds x 5 probes
    python tools/boundary_budget.py --seeds 3 --probes 9 --reps 200
    python tools/boundary_budget.py --probes 9 --independent   # the fit without seed offsets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from boundary_sim import KEY, sweep_trainable, true_boundaries  # noqa: E402
from test_boundary_coverage import HIGH, LOW, drive  # noqa: E402

from freetf.sweeps.boundary import BoundarySearch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--initial", type=int, default=3)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--independent", action="store_true",
                        help="read every verdict as its own draw (no seed offsets)")
    args = parser.parse_args()
    if args.independent:
        from freetf.evaluation import verdicts

        verdicts.SEED_SDS = (0.0,)
    offset_c, offset_l = true_boundaries(0.0, 0.0)
    hits = {"collapse": 0, "leak": 0}
    widths: dict[str, list[float]] = {"collapse": [], "leak": []}
    budget = 0
    for rep in range(args.reps):
        rng = np.random.default_rng(1000 + rep)
        x_c, x_l = rng.uniform(-4.5, -2.0), rng.uniform(-0.5, 1.3)
        search = BoundarySearch(KEY, LOW, HIGH, [{"training.kl_weight": 1.0}],
                                {KEY: 1.0, "training.kl_weight": 1.0}, 8,
                                list(range(args.seeds)), args.probes, args.initial)
        drive(search, sweep_trainable(rng, x_c, x_l), rng)
        budget = search.budget
        fits = search.fits(0, confidence=0.95)
        hits["collapse"] += fits["collapse"].contains(x_c + offset_c)
        hits["leak"] += fits["leak"].contains(x_l + offset_l)
        for kind, fit in fits.items():
            widths[kind].append(fit.high_log2 - fit.low_log2)
    fit = "verdicts as independent draws" if args.independent else "seed offsets"
    print(f"{args.seeds} seeds x {args.probes} probes ({budget} trials), {args.reps} reps, "
          f"fit with {fit}")
    for kind in ("collapse", "leak"):
        w = np.asarray(widths[kind])
        print(f"  {kind:8s} coverage {hits[kind] / args.reps:.1%}  median width "
              f"{np.median(w):.2f} log2  share <= 2 log2 {np.mean(w <= 2.0):.0%}")


if __name__ == "__main__":
    main()
