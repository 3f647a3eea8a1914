"""Ray overhead (item 5): TorchTrainer with 1 worker vs the in-process loop, Ray start-up.

Runs the same config (``configs/synthetic.yaml`` shape unless ``--tiny``) twice per round,
in-process and through ``TorchTrainer`` (1 worker, the whole machine's CPUs), alternating
the order between rounds.  Steady-state tokens/s is the median of the loop's own
``train/tokens_per_s`` log points after the first (warm-up) one.  Also timed: starting a
local Ray (``init_ray``) and one ``TorchTrainer.fit`` end to end minus its training time
(start-up, worker placement, teardown).  Target: Ray/in-process >= 0.9.

Per-trial overhead of a Tune sweep: two sweeps through ``freetf.sweep.run_sweep`` (the
smoke spec, trials of 2 training steps run one at a time, ASHA and the stopper off), one
of 1 trial and one of ``1 + --tune-trials``; the difference of their wall times over the
extra trials is what a trial costs beyond its training: the trial actor, the Train
controller and worker start-up, its MLflow child run, teardown (the sweep's fixed costs,
its parent run and report, cancel out).

    python bench/ray_overhead.py --json bench/results/ray_overhead.json [--tiny]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, finish, parser, table  # noqa: E402

from freetf import load_config  # noqa: E402
from freetf.training.loop import train_loop  # noqa: E402


def steady_rate(history: list[dict]) -> float:
    rates = [h["train/tokens_per_s"] for h in history if "train/tokens_per_s" in h]
    return statistics.median(rates[1:] if len(rates) > 2 else rates)


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--tune-trials", type=int, default=3,
                   help="extra trials of the per-trial overhead sweep (0: skip it)")
    args = p.parse_args()
    env = environment()
    import ray

    from freetf.training.ray_train import build_trainer, init_ray

    steps = 12 if args.tiny else 150
    config = "configs/tiny.yaml" if args.tiny else "configs/synthetic.yaml"
    tmp = Path(tempfile.mkdtemp(prefix="freetf-bench-ray-"))
    cpus = os.cpu_count() or 2
    cfg = load_config(config, [
        f"training.max_steps={steps}", "training.log_every=10", "training.eval_every=0",
        "training.eval_batches=1", "tracking.mlflow.enabled=false", "checkpoint.keep=1",
        f"checkpoint.dir={tmp}/ckpt", f"scaling.storage_path={tmp}/ray",
        f"scaling.cpus_per_worker={cpus}"])

    start = time.perf_counter()
    init_ray(num_cpus=cpus)  # a new local Ray, as `freetf train` starts
    ray_init_s = time.perf_counter() - start
    rows: dict[str, list[float]] = {"in_process": [], "ray_1_worker": [], "fit_overhead_s": []}
    try:
        for r in range(args.repeats):
            order = ("in_process", "ray") if r % 2 == 0 else ("ray", "in_process")
            for kind in order:
                if kind == "in_process":
                    rows["in_process"].append(steady_rate(train_loop(cfg).history))
                    continue
                run_cfg = cfg.replace([f"scaling.run_name=bench-{r}"])
                t0 = time.perf_counter()
                result = build_trainer(run_cfg).fit()
                fit_s = time.perf_counter() - t0
                history = result.metrics_dataframe.to_dict("records")
                rows["ray_1_worker"].append(steady_rate(history))
                tokens = steps * cfg.training.batch_size * cfg.data.max_seq_len
                rows["fit_overhead_s"].append(fit_s - tokens / rows["ray_1_worker"][-1])
        trial_s = tune_trial_overhead(tmp, args.tune_trials) if args.tune_trials > 0 else None
    finally:
        ray.shutdown()
    inproc = statistics.median(rows["in_process"])
    via_ray = statistics.median(rows["ray_1_worker"])
    result = {
        "config": config, "steps": steps, "repeats": args.repeats,
        "in_process_tokens_per_s": inproc, "ray_tokens_per_s": via_ray,
        "ray_over_in_process": via_ray / inproc, "target": 0.9,
        "ray_init_s": ray_init_s, "fit_overhead_s": statistics.median(rows["fit_overhead_s"]),
        "tune_trial_overhead_s": trial_s, "tune_trials": args.tune_trials, "raw": rows,
    }
    text = table(["measure", "value"], [
        ["in-process tokens/s (median)", f"{inproc:,.0f}"],
        ["TorchTrainer 1 worker tokens/s", f"{via_ray:,.0f}"],
        ["ratio Ray / in-process (target >= 0.9)", f"{via_ray / inproc:.3f}"],
        ["ray.init (local) s", f"{ray_init_s:.1f}"],
        ["TorchTrainer.fit start-up + teardown s", f"{result['fit_overhead_s']:.1f}"],
        *([["Tune sweep: s per trial beyond training", f"{trial_s:.1f}"]]
          if trial_s is not None else []),
    ])
    finish("ray_overhead", args, result, text, env)


def tune_trial_overhead(tmp: Path, extra_trials: int) -> float:
    """Seconds a sweep trial costs beyond its training (see the module docstring)."""
    from freetf.sweeps.spec import load_sweep
    from freetf.sweeps.sweep import run_sweep

    def sweep_s(trials: int) -> float:
        weights = ", ".join(str(0.1 * (i + 1)) for i in range(trials))
        name = f"bench-trials-{trials}"
        sweep = load_sweep("configs/search_kl_smoke.yaml", [
            "training.max_steps=2", "training.log_every=1", "training.eval_batches=1",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"storage_path={tmp}/tune", f"report_dir={tmp}/reports",
            f"mlflow.sweep_name={name}", "asha.enabled=false", "stopper.enabled=false",
            "search.method=grid",  # the smoke file ships as a boundary search
            "search.max_concurrent_trials=1", "space.training.free_bits_bits={grid: [1.0]}",
            f"space.training.kl_weight={{grid: [{weights}]}}"])
        start = time.perf_counter()
        result = run_sweep(sweep)
        elapsed = time.perf_counter() - start
        if result.interrupted or len(result.runs) != trials:
            raise RuntimeError(f"sweep {name} did not run its {trials} trials")
        return elapsed

    one = sweep_s(1)
    return (sweep_s(1 + extra_trials) - one) / extra_trials


if __name__ == "__main__":
    main()
