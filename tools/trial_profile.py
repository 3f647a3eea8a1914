"""Where a trial of the default sweep spends its time: training steps vs evaluations.

Trains one Free Transformer trial of ``freetf/configs/search_kl.yaml`` (its base config and
overrides, one kappa, one seed) in this process, without Ray or MLflow, and times each
evaluation (``freetf.training.evaluate.evaluate``, wrapped) and each of its parts:
the latent diagnostics, the task measures (use of Z, honest bound, exact floor) and the
free generations.  What the default sweep's budget is made of (docs/sweeps.md, Measured).

    python tools/trial_profile.py                       # 1000 steps, kappa 1/4 bit
    python tools/trial_profile.py --steps 200 --kappa 1 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--kappa", type=float, default=0.25, help="free bits, bits per token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a sweep trial on 2 cores: 1)")
    args = parser.parse_args(argv)

    import tempfile

    import torch

    from freetf.sweeps.spec import load_sweep
    from freetf.training import evaluate as evaluate_module
    from freetf.training import loop
    from freetf.training.context import TrainContext

    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(name: str, module, attribute: str) -> None:
        inner = getattr(module, attribute)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1
        setattr(module, attribute, wrapper)

    timed("evaluation", loop, "evaluate")  # the name the loop calls
    for name, attribute in (("  latent diagnostics", "latent_diagnostics"),
                            ("  task measures", "task_measures"),
                            ("  free generations", "free_generations")):
        timed(name, evaluate_module, attribute)  # the names evaluate() calls
    spec = load_sweep(ROOT / "freetf" / "configs" / "search_kl.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = spec.base().replace({
            "training.free_bits_bits": args.kappa, "model.latent_dim": 8,
            "training.max_steps": args.steps, "training.seed": args.seed,
            "scaling.use_ray": False, "tracking.mlflow.enabled": False,
            "checkpoint.every_steps": 0, "checkpoint.dir": tmp})
        start = time.perf_counter()
        loop.train_loop(cfg, TrainContext())
        total = time.perf_counter() - start
    print(f"one trial: {args.steps} steps, kappa {args.kappa:g} bit, seed {args.seed}, "
          f"{args.threads} torch thread(s): {total:.1f} s")
    train = total - seconds["evaluation"]
    print(f"  {'training steps':20s} {train:6.1f} s  {train / total:6.1%}  "
          f"({train / args.steps * 1000:.1f} ms a step)")
    for name in ("evaluation", "  latent diagnostics", "  task measures", "  free generations"):
        print(f"  {name:20s} {seconds[name]:6.1f} s  {seconds[name] / total:6.1%}  "
              f"({calls[name]} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
