"""The training loop: one function for the baseline and the Free Transformer.

``train_loop(cfg, context)`` runs in-process (tests, debugging) or inside Ray Train
workers; Ray touches it only through a :class:`TrainContext` (prepare the model, report
metrics and checkpoints, find the checkpoint to resume from).  Nothing here imports Ray.

Determinism across world sizes and accumulation: the bits of Z are sampled from uniform
noise drawn per optimizer step for all the *global* micro-batches and sliced by rank, and
the data stream gives rank ``r`` the rows ``r::world_size`` of the global batch, so 2
workers of batch b, and 2 accumulated micro-batches of batch b, follow the same
trajectory as 1 worker of batch 2b (to float tolerance).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config
from freetf.data.datasets import DataBundle, build_data
from freetf.data.stream import BatchStream
from freetf.evaluation.verdicts import run_plateau
from freetf.model.losses import HeadInputs, compute_loss
from freetf.model.transformer import FreeTransformer
from freetf.training.context import LogWindow, TrainContext, TrainResult
from freetf.training.evaluate import evaluate
from freetf.training.loop_state import resume_state, save_state
from freetf.training.optim import amp_dtype, build_optimizer
from freetf.training.parallel import clip_grad_norm, gradient_sync, is_fsdp, unsharded
from freetf.training.schedules import build_lr_scheduler, schedule_values
from freetf.training.stop import TrainingStopped

log = logging.getLogger(__name__)


# The report a runner gets at a non-finite stop (see TrainContext.checkpoint_at_nonfinite_stop):
# the number of non-finite steps in a row.
NONFINITE_STOP_KEY = "stopped/nonfinite_steps"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient.

    ``checkpoint`` is the last checkpoint this run saved before the stop (None if none);
    :meth:`explain` turns the stop into what a user reads: what happened, where the last
    checkpoint is, and what to change in the config.
    """

    def __init__(self, count: int, step: int, checkpoint: Path | None = None) -> None:
        super().__init__(f"{count} consecutive non-finite steps by step {step}; stopping")
        self.count, self.step, self.checkpoint = count, step, checkpoint

    def __reduce__(self):
        return type(self), (self.count, self.step, self.checkpoint)

    def explain(self, cfg: Config, checkpoint: Path | None) -> str:
        """The stop in plain words; ``checkpoint``: the persisted one the user can load."""
        tcfg = cfg.training
        lines = [f"training stopped at step {self.step}: {self.count} steps in a row had a "
                 f"non-finite loss or gradient (training.max_consecutive_nonfinite="
                 f"{tcfg.max_consecutive_nonfinite}); their updates were skipped."]
        if checkpoint is not None:
            lines.append(f"The last checkpoint is {checkpoint}; it holds finite weights "
                         f"(resume from it with --resume after changing the config).")
        else:
            lines.append("No checkpoint was saved before the stop"
                         + (" (checkpoint.every_steps=0 saves only at the end)."
                            if not cfg.checkpoint.every_steps else "."))
        fixes = [f"lower training.learning_rate (now {tcfg.learning_rate:g})"]
        if tcfg.warmup_steps < 100:
            fixes.append(f"lengthen training.warmup_steps (now {tcfg.warmup_steps})")
        if tcfg.grad_clip <= 0:
            fixes.append("turn on gradient clipping, e.g. training.grad_clip=1.0 (now off)")
        if tcfg.amp == "fp16":
            fixes.append("use training.amp=bf16 (fp16 overflows more easily)")
        lines.append("To change: " + "; or ".join(fixes) + ".")
        return "\n".join(lines)


class InjectedFailure(RuntimeError):
    """Raised once at ``training.fail_at_step`` to exercise fault tolerance."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps on the device; the host looks only when asked.

    ``observe`` takes one step's flag (a 0-dim bool tensor) without a host sync;
    ``check`` (at log, eval and checkpoint steps, which sync anyway, or right after a
    skip the host already saw) warns about new skips and raises
    :class:`NonFiniteLossError` once ``limit`` steps in a row were non-finite.
    """

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.zeros_like(self.total)  # current run of non-finite steps
        self.longest = torch.zeros_like(self.total)  # longest run since the last check
        self.reported = 0

    def observe(self, bad: torch.Tensor) -> None:
        self.total += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def check(self, step: int, checkpoint: Path | None) -> int:
        """-> total skipped steps so far.  ``checkpoint``: the last one saved, for the error."""
        total, longest, run = torch.stack([self.total, self.longest, self.run]).tolist()
        if total > self.reported:
            log.warning("step %d: %d non-finite step(s) skipped since the last check "
                        "(loss or gradient; %d in a row now)", step, total - self.reported, run)
            self.reported = total
        if longest >= self.limit:
            raise NonFiniteLossError(longest, step, checkpoint)
        self.longest = self.run.clone()
        return total


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.training.max_steps:
        return cfg.training.max_steps
    return max(1, cfg.training.num_epochs * steps_per_epoch // cfg.training.grad_accum_steps)


def step_noise(cfg: Config, step: int, global_batch: int, seq_len: int, rank: int,
               world_size: int) -> torch.Tensor | None:
    """Uniform noise for the bits of Z of this rank's rows at every micro-batch of a step.

    One draw per optimizer step for all ``grad_accum_steps`` global micro-batches, in row
    order, sliced by rank: -> (k, b, T, H).  So w workers of batch b, and k micro-batches
    of batch b, see the bits that one worker of batch k w b sees.
    """
    if not cfg.model.has_latent:
        return None
    gen = torch.Generator().manual_seed(cfg.training.seed * 1_000_003 + step)
    noise = torch.rand(cfg.training.grad_accum_steps, global_batch, seq_len,
                       cfg.model.latent_dim, generator=gen)  # (k, G, T, H)
    return noise[:, rank::world_size]  # (k, b, T, H)


def train_loop(cfg: Config, context: TrainContext | None = None,
               tracker: Any | None = None, data: DataBundle | None = None) -> TrainResult:
    """Train ``cfg`` to ``training.max_steps`` (or ``num_epochs``), resuming if asked."""
    ctx = context or TrainContext()
    ctx.mark("loop_start")
    tcfg = cfg.training
    device = ctx.resolve_device(cfg)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    data = data or build_data(cfg)
    stream = BatchStream(data.train, tcfg.batch_size, ctx.rank, ctx.world_size,
                         seed=cfg.data.seed, num_workers=cfg.data.num_workers)
    steps = ctx.total_steps = total_steps(cfg, stream.steps_per_epoch)
    ctx.mark("data_built")

    raw_model = FreeTransformer(cfg.model).to(device)
    if tcfg.gradient_checkpointing:
        raw_model.gradient_checkpointing_enable()
    raw_model = ctx.shard_model(raw_model, cfg)  # FSDP: in place, before the optimizer
    offloaded = cfg.scaling.fsdp_cpu_offload and is_fsdp(raw_model)
    optimizer = build_optimizer(raw_model, cfg, torch.device("cpu") if offloaded else device)
    scheduler = build_lr_scheduler(optimizer, tcfg.warmup_steps, steps, cfg.scheduler.min_lr,
                                   cfg.scheduler.type)
    torch.manual_seed(tcfg.seed * 1000 + ctx.rank)  # dropout and prior samples, per rank
    start_step, resumed = resume_state(ctx, raw_model, optimizer, scheduler, stream, device)
    model = ctx.prepare_model(torch.compile(raw_model) if tcfg.compile else raw_model)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if ctx.is_main:
        counts = raw_model.num_parameters()
        log.info("model: %s, %d parameters (%s), %d steps of %d x %d tokens on %s",
                 "free transformer" if cfg.model.has_latent else "baseline", counts["total"],
                 ", ".join(f"{k}={v}" for k, v in counts.items() if k != "total"), steps,
                 tcfg.batch_size * ctx.world_size * tcfg.grad_accum_steps,
                 cfg.data.max_seq_len, device)
        if tracker is not None:
            tracker.log_params({"num_parameters": counts["total"], "total_steps": steps})

    guard = NonFiniteGuard(tcfg.max_consecutive_nonfinite, device)
    # Fused AdamW skips a non-finite update on the device (found_inf), so the loop never
    # waits for the GPU between log steps.  Otherwise the step decides on the host: free
    # on CPU, and fp16's GradScaler syncs every step anyway.
    sync_free = bool(optimizer.defaults.get("fused")) and not scaler.is_enabled()
    chunked_ce = tcfg.cross_entropy == "chunked"
    metrics: dict[str, float] = {}
    checkpoint: Path | None = None

    def check_nonfinite(at_step: int) -> int:
        try:
            return guard.check(at_step, checkpoint)
        except NonFiniteLossError as err:
            if ctx.checkpoint_at_nonfinite_stop:
                report: dict[str, Any] = {"step": at_step, NONFINITE_STOP_KEY: float(err.count)}
                if cfg.checkpoint.metric.startswith("eval/"):  # what the runner keeps by
                    with unsharded(raw_model):
                        evaluated = evaluate(raw_model, data, cfg, device,
                                             sched["free_bits_nats"])
                    report.update({k: v for k, v in evaluated.items() if not isinstance(v, str)})
                err.checkpoint = save_state(ctx, cfg, raw_model, optimizer, scheduler,
                                            stream, at_step, report, device,
                                            checkpoint or resumed)
                ctx.report(report, err.checkpoint)
            raise
    tokens_since, t_since = 0, time.perf_counter()
    window = LogWindow()
    nonfinite_total = 0
    model.train()
    ctx.mark("model_built")
    for step in range(start_step, steps):
        if tcfg.fail_at_step is not None and step == tcfg.fail_at_step and start_step == 0:
            raise InjectedFailure(f"injected failure at step {step} (training.fail_at_step)")
        sched = schedule_values(cfg, step, steps)
        seq_len = int(sched["max_seq_len"])
        step_parts: dict[str, torch.Tensor] = {}
        noise = step_noise(cfg, step, tcfg.batch_size * ctx.world_size, seq_len, ctx.rank,
                           ctx.world_size)  # (k, b, T, H)
        for micro in range(tcfg.grad_accum_steps):
            ids = next(stream)[:, :seq_len].to(device, non_blocking=True)  # (b, T)
            # DDP and FSDP reduce gradients in the last micro-batch's backward only
            with gradient_sync(model, micro == tcfg.grad_accum_steps - 1):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits, z_logits = model(
                        ids, mode="training",
                        bit_noise=None if noise is None else noise[micro].to(device),
                        return_hidden=chunked_ce)
                    if chunked_ce:  # the LM head is applied chunk-wise inside the loss
                        logits = HeadInputs(logits, raw_model.lm_head.weight,
                                            tcfg.cross_entropy_chunk_tokens)
                    loss, parts = compute_loss(
                        logits[:, :-1], None if z_logits is None else z_logits[:, :-1],
                        ids[:, 1:], sched["kl_weight"], sched["free_bits_nats"],
                        free_bits_per=tcfg.free_bits_per)
                scaler.scale(loss / tcfg.grad_accum_steps).backward()  # outside autocast
            for key, value in parts.items():
                if value.dim() == 0:
                    step_parts[key] = step_parts.get(key, 0.0) + value / tcfg.grad_accum_steps
            tokens_since += ids.numel() * ctx.world_size
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(raw_model.parameters(), tcfg.grad_clip).to(device)
        # The norm is global (DDP all-reduces gradients; under FSDP the shards' partial
        # norms are reduced), so every rank takes the same decision.  (.to: with FSDP's
        # CPU offload the gradients, hence the norm, are on the CPU.)
        # fp16: an overflowed gradient is GradScaler's business (it skips the update and
        # lowers the scale); only a non-finite loss counts towards the stop.
        grads_ok = torch.isfinite(grad_norm)  # () bool, on device
        loss_ok = torch.isfinite(step_parts["total"])  # every micro-batch's loss
        bad = ~loss_ok if scaler.is_enabled() else ~(grads_ok & loss_ok)
        guard.observe(bad)
        if sync_free:
            optimizer.found_inf = bad.float()  # read by fused AdamW (GradScaler's protocol)
            optimizer.step()
        elif bad.item():
            check_nonfinite(step + 1)  # warns; stops after N in a row
        else:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_parts["grad_norm"] = grad_norm.detach()
        window.add(step_parts)
        done = step + 1
        last = done == steps
        if step == start_step:
            ctx.mark("first_step")
        if last:
            ctx.mark("last_step")
        # A stop asked by a signal (stop.py) ends the run here, with a checkpoint; ranks
        # agree on it at log steps (the context's business), so all stop alike.
        stop = ctx.requested_stop(sync_point=done % tcfg.log_every == 0 or last)
        want_ckpt = (last or stop is not None
                     or (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0))
        # A checkpoint kept by an eval metric (checkpoint.metric) needs that metric beside it.
        want_eval = (last or (tcfg.eval_every and done % tcfg.eval_every == 0)
                     or (want_ckpt and cfg.checkpoint.metric.startswith("eval/")))
        if done % tcfg.log_every == 0 or want_eval or want_ckpt:
            nonfinite_total = check_nonfinite(done)  # before any save
        if done % tcfg.log_every == 0 or last or stop is not None:
            elapsed = time.perf_counter() - t_since
            metrics = _train_metrics(window.means(), sched, optimizer, tokens_since / elapsed,
                                     nonfinite_total, stream.epoch)
            window, tokens_since, t_since = LogWindow(), 0, time.perf_counter()
        if want_eval:
            with unsharded(raw_model):  # FSDP: rank 0 alone decodes the samples
                metrics.update(evaluate(raw_model, data, cfg, device, sched["free_bits_nats"],
                                        samples=last and ctx.is_main,
                                        generations=ctx.is_main))
            metrics.update(run_plateau([*ctx.history, metrics], cfg.diagnostics,
                                       sched["free_bits_nats"] / math.log(2.0)))
            model.train()
        if done % tcfg.log_every == 0 or want_eval or want_ckpt:
            report = {k: v for k, v in metrics.items() if not isinstance(v, str | list)}
            if ctx.is_main and tracker is not None:  # MLflow's x axis is the step already
                tracker.log_metrics(report | {"train/steps_done": done}, step=done)
            report["step"] = done  # Tune's time attribute, and the checkpoint's
            if want_ckpt:
                checkpoint = save_state(ctx, cfg, raw_model, optimizer, scheduler, stream,
                                        done, report, device, checkpoint or resumed)
            if last:
                ctx.mark("train_end")  # before the final report, which carries the marks
            ctx.report(metrics | {"step": done}, checkpoint if want_ckpt else None,
                       essential=bool(want_eval or want_ckpt))
            if ctx.is_main and done % tcfg.log_every == 0:
                log.info("step %d/%d loss %.4f recon %.4f kl %.3f nats %.0f tok/s", done, steps,
                         metrics.get("train/loss", float("nan")),
                         metrics.get("train/ce_nats", float("nan")),
                         metrics.get("train/kl_nats", 0.0),
                         metrics.get("train/tokens_per_s", 0.0))
        if stop is not None and not last:
            stream.close()
            raise TrainingStopped(stop, done, checkpoint)
    stream.close()
    return TrainResult(steps, metrics, ctx.history, checkpoint, nonfinite_total)


def _train_metrics(means, sched, optimizer, tokens_per_s, nonfinite, epoch):
    metrics = {
        "train/loss": means.get("total", float("nan")),
        "train/ce_nats": means.get("reconstruction", float("nan")),
        "train/grad_norm": means.get("grad_norm", float("nan")),
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/tokens_per_s": tokens_per_s,
        "train/nonfinite_steps": float(nonfinite),
        "train/epoch": float(epoch),
    }
    if "kl" in means:
        metrics.update({
            "train/kl_hinged_nats": means["kl"], "train/kl_nats": means["kl_raw_nats"],
            "train/kl_bits": means["kl_raw_bits"], "train/kl_weight": sched["kl_weight"],
            "train/free_bits_nats": sched["free_bits_nats"],
            "train/free_bits_bits": sched["free_bits_nats"] / math.log(2.0),
        })
    return metrics
