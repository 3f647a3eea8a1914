"""Ray overhead (item 5): TorchTrainer with 1 worker vs the in-process loop, Ray start-up.

Runs the same config (``freetf/configs/synthetic.yaml`` shape unless ``--tiny``) twice per round,
in-process and through ``TorchTrainer`` (1 worker, the whole machine's CPUs), alternating
the order between rounds.  Steady-state tokens/s is the median of the loop's own
``train/tokens_per_s`` log points after the first (warm-up) one.  Also timed: starting a
local Ray (``init_ray``) and one ``TorchTrainer.fit`` end to end minus its training time
(start-up, worker placement, teardown).  Target: Ray/in-process >= 0.9.

Per-trial overhead of a Tune sweep of TorchTrainer trials (``resources.trial_runner=train``):
two sweeps through ``freetf.sweeps.sweep.run_sweep`` (the
smoke spec, trials of 2 training steps run one at a time, ASHA and the stopper off), one
of 1 trial and one of ``1 + --tune-trials``; the difference of their wall times over the
extra trials is what a trial costs beyond its training: the trial actor, the Train
controller and worker start-up, its MLflow child run, teardown (the sweep's fixed costs,
its parent run and report, cancel out).

Old path vs new path (issue: sweep throughput): the 8-trial grid sweep that was the
default (``bench/search_kl_grid8.yaml``, a copy) run through ``run_sweep`` once per trial
runner, each with a fresh local Ray, one after the other in one invocation:

- ``old``: every trial a TorchTrainer with one worker, a fresh trial process per trial
  (``resources.trial_runner=train``: the path every sweep took before);
- ``in_trial_fresh``: the loop in the trial process, a fresh process per trial
  (``trial_runner=in_trial``, ``reuse_actors=false``);
- ``new_no_preload``: the loop in the trial process, processes reused, the trial
  libraries imported by each slot's first trial (``resources.preload=false``);
- ``new``: the default, the loop in the trial process, processes reused, and the
  libraries a trial needs imported as each process starts (``trial_runner=auto``
  resolves to in_trial, ``reuse_actors=true``, ``preload=true``);
- ``default``: the main job itself, ``freetf/configs/search_kl.yaml`` (a boundary search of 18
  trials) on the default path.

Per trial: wall time on Tune's clock (the driver's ``on_trial_start`` to
``on_trial_complete``), training time on the trial's own clock (the loop's marks, from
the built model to the end of its final evaluation and checkpoint), and their
difference, the overhead.  Also the sweep's total wall time (``run_sweep``, Ray start
included) and one trial's timeline.

    python bench/ray_overhead.py --json bench/results/ray_overhead.json [--tiny]
    python bench/ray_overhead.py --repeats 1 --skip-item5 \
        --sweeps old,new_no_preload,new,default --json bench/results/sweep_paths.json
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
    p.add_argument("--sweeps", default="",
                   help=f"comma-separated sweep paths to compare ({', '.join(SWEEP_PATHS)}); "
                        f"empty: skip")
    p.add_argument("--skip-item5", action="store_true",
                   help="only the sweep comparison (no in-process / TorchTrainer rounds)")
    args = p.parse_args()
    paths = [name for name in args.sweeps.split(",") if name]
    unknown = sorted(set(paths) - set(SWEEP_PATHS))
    if unknown:
        p.error(f"--sweeps: unknown path {unknown[0]}; choose from {', '.join(SWEEP_PATHS)}")
    if args.skip_item5:
        env = environment()
        tmp = Path(tempfile.mkdtemp(prefix="freetf-bench-ray-"))
        result = compare_sweep_paths(tmp, paths, args.tiny)
        finish("ray_overhead", args, result, sweep_text(result), env)
        return
    env = environment()
    import ray

    from freetf.training.ray_train import build_trainer, init_ray

    steps = 12 if args.tiny else 150
    config = "freetf/configs/tiny.yaml" if args.tiny else "freetf/configs/synthetic.yaml"
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
    sweeps = compare_sweep_paths(tmp, paths, args.tiny) if paths else None
    inproc = statistics.median(rows["in_process"])
    via_ray = statistics.median(rows["ray_1_worker"])
    result = {
        "config": config, "steps": steps, "repeats": args.repeats,
        "in_process_tokens_per_s": inproc, "ray_tokens_per_s": via_ray,
        "ray_over_in_process": via_ray / inproc, "target": 0.9,
        "ray_init_s": ray_init_s, "fit_overhead_s": statistics.median(rows["fit_overhead_s"]),
        "tune_trial_overhead_s": trial_s, "tune_trials": args.tune_trials, "raw": rows,
        "sweep_paths": sweeps,
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
    if sweeps:
        text += "\n\n" + sweep_text(sweeps)
    finish("ray_overhead", args, result, text, env)


def tune_trial_overhead(tmp: Path, extra_trials: int) -> float:
    """Seconds a sweep trial costs beyond its training (see the module docstring)."""
    from freetf.sweeps.spec import load_sweep
    from freetf.sweeps.sweep import run_sweep

    def sweep_s(trials: int) -> float:
        weights = ", ".join(str(0.1 * (i + 1)) for i in range(trials))
        name = f"bench-trials-{trials}"
        sweep = load_sweep("freetf/configs/search_kl_smoke.yaml", [
            "training.max_steps=2", "training.log_every=1", "training.eval_batches=1",
            f"tracking.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"storage_path={tmp}/tune", f"report_dir={tmp}/reports",
            f"mlflow.sweep_name={name}", "asha.enabled=false", "stopper.enabled=false",
            "search.method=grid",  # the smoke file ships as a boundary search
            "search.max_concurrent_trials=1", "space.training.free_bits_bits={grid: [1.0]}",
            "resources.trial_runner=train",  # the TorchTrainer path (--sweeps: the others)
            f"space.training.kl_weight={{grid: [{weights}]}}"])
        start = time.perf_counter()
        result = run_sweep(sweep)
        elapsed = time.perf_counter() - start
        if result.interrupted or len(result.runs) != trials:
            raise RuntimeError(f"sweep {name} did not run its {trials} trials")
        return elapsed

    one = sweep_s(1)
    return (sweep_s(1 + extra_trials) - one) / extra_trials


# ----------------------------------------------------------------------------- sweep paths

GRID8 = Path(__file__).resolve().parent / "search_kl_grid8.yaml"
DEFAULT = Path(__file__).resolve().parents[1] / "freetf" / "configs" / "search_kl.yaml"
SWEEP_PATHS = {  # name: (spec, settings)
    "old": (GRID8, ["resources.trial_runner=train", "resources.reuse_actors=false"]),
    "in_trial_fresh": (GRID8, ["resources.trial_runner=in_trial",
                               "resources.reuse_actors=false"]),
    "new_no_preload": (GRID8, ["resources.preload=false"]),
    "new": (GRID8, []),
    "default": (DEFAULT, []),  # the main job: `python tune/search_kl.py`, a boundary search
}
# The trial's timeline: its marks (trial process and training loop), in order.
TIMELINE = (("process_start", "trial process started"), ("trial_start", "trial function entered"),
            ("imports", "imports done, MLflow run looked up"),
            ("mlflow_run", "MLflow child run started (params, config.yaml)"),
            ("loop_start", "training loop entered (state reset)"), ("data_built", "data built"),
            ("model_built", "model and optimizer built"), ("first_step", "first step done"),
            ("last_step", "last step done"),
            ("train_end", "final evaluation and checkpoint written"))


def compare_sweep_paths(tmp: Path, paths: list[str], tiny: bool) -> dict:
    """Run the grid sweep once per path (see the module docstring)."""
    root = Path(__file__).resolve().parents[1]
    out = {"specs": {name: str(SWEEP_PATHS[name][0].relative_to(root) if not tiny else
                               "freetf/configs/search_kl_smoke.yaml") for name in paths},
           "paths": {}}
    for name in paths:
        out["paths"][name] = _sweep_path(tmp / name, name, tiny)
    if "old" in out["paths"] and "new" in out["paths"]:
        out["new_over_old_wall"] = out["paths"]["new"]["wall_s"] / out["paths"]["old"]["wall_s"]
    return out


def _sweep_path(tmp: Path, name: str, tiny: bool) -> dict:
    import ray
    from ray import tune

    from freetf.sweeps.spec import load_sweep
    from freetf.sweeps.sweep import run_sweep

    class TrialClock(tune.Callback):
        def __init__(self) -> None:
            self.trials: dict[str, dict] = {}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.trials[trial.trial_id] = {"start": time.time()}

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.trials[trial.trial_id].update(last=dict(result), last_at=time.time())

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.trials[trial.trial_id]["end"] = time.time()

    settings = [f"tracking.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"storage_path={tmp}/tune", f"report_dir={tmp}/reports",
                f"mlflow.sweep_name=bench-{name}", *SWEEP_PATHS[name][1]]
    if tiny:
        settings += ["training.max_steps=4", "training.log_every=2", "training.eval_every=2",
                     "stopper.enabled=false", "asha.enabled=false"]
    clock = TrialClock()
    sweep = load_sweep("freetf/configs/search_kl_smoke.yaml" if tiny else SWEEP_PATHS[name][0],
                       settings)
    start = time.perf_counter()
    try:
        result = run_sweep(sweep, callbacks=[clock])
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - start
    if result.interrupted:
        raise RuntimeError(f"sweep path {name} was interrupted")
    trials, trained_s = [], 0.0
    for record in sorted(clock.trials.values(), key=lambda r: r["start"]):
        last = record.get("last", {})
        marks = {k[len("timeline/"):]: v for k, v in last.items() if k.startswith("timeline/")}
        if "end" not in record or "train_end" not in marks:
            # stopped early (no final evaluation): trained until its last report
            if "model_built" in marks:
                trained_s += record["last_at"] - marks["model_built"]
            continue
        trained_s += marks["train_end"] - marks["model_built"]
        trial_wall = record["end"] - record["start"]
        train_s = marks["train_end"] - marks["model_built"]
        trials.append({"wall_s": trial_wall, "train_s": train_s,
                       "overhead_s": trial_wall - train_s, "ratio": train_s / trial_wall,
                       "step": last.get("step"), "tune_start": record["start"],
                       "tune_end": record["end"], "marks": marks})
    slots = _most_at_once([(r["start"], r.get("end", r["start"])) for r in clock.trials.values()])
    return {"wall_s": wall_s, "trials": trials, "trials_run": len(clock.trials),
            # every second of every trial slot, Ray start-up and gaps included
            "slots": slots, "amortized_ratio": trained_s / (wall_s * slots),
            "amortized_overhead_s": (wall_s * slots - trained_s) / len(clock.trials),
            "median_ratio": statistics.median(t["ratio"] for t in trials),
            "min_ratio": min(t["ratio"] for t in trials),
            "median_overhead_s": statistics.median(t["overhead_s"] for t in trials),
            "max_overhead_s": max(t["overhead_s"] for t in trials),
            "mean_train_s": statistics.mean(t["train_s"] for t in trials)}


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def sweep_text(result: dict) -> str:
    paths = result["paths"]
    lines = [table(["sweep path", "wall s", "trials", "train/wall (median, min)",
                    "overhead s (median, max)", "train s (mean)", "amortized train/wall",
                    "amortized overhead s"], [
        [name, p["wall_s"], p["trials_run"], f"{p['median_ratio']:.2f}, {p['min_ratio']:.2f}",
         f"{p['median_overhead_s']:.1f}, {p['max_overhead_s']:.1f}", p["mean_train_s"],
         p["amortized_ratio"], p["amortized_overhead_s"]]
        for name, p in paths.items()])]
    lines.append("per trial: Tune's clock, from the trial's start (its process already up) to "
                 "its end; amortized: the sweep's wall time x trial slots, Ray start-up, "
                 "process start-up and gaps included, per trial")
    if "new_over_old_wall" in result:
        lines.append(f"total wall time new / old: {result['new_over_old_wall']:.2f} "
                     f"(target <= 0.60); spec {result['specs']['new']}")
    for name, p in paths.items():
        for index in sorted({0, len(p["trials"]) - 1}):  # the first and the last trial
            lines += ["", f"timeline of trial {index + 1} of path {name} (s from Tune's "
                          f"trial start; negative: before it)", _timeline(p["trials"][index])]
    return "\n".join(lines)


def _timeline(trial: dict) -> str:
    t0, marks = trial["tune_start"], trial["marks"]
    rows, previous = [], None
    for key, label in TIMELINE:
        if key not in marks:
            continue
        at = marks[key] - t0
        rows.append([label, f"{at:+.2f}", "" if previous is None else f"{at - previous:.2f}"])
        previous = at
    end = trial["tune_end"] - t0
    rows.append(["trial ended (Tune): report, artifacts, run closed",
                 f"{end:+.2f}", "" if previous is None else f"{end - previous:.2f}"])
    return table(["event", "at s", "since previous s"], rows)


if __name__ == "__main__":
    main()
