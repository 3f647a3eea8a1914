"""Shared pieces of the freetf benchmarks: shapes, the training step, timing, FLOPs, memory.

Every figure the scripts report is a median of repeated runs, or a ratio of two things
measured in the same process, interleaved round by round (A B C, B C A, ...), so that
load from other processes on a shared machine hits the compared configurations alike.

Run as scripts from the repository root (``python bench/step_throughput.py``); this
module is imported as ``common`` from the script's own folder.  It is also the entry
point of the fresh subprocess that measures activation memory (``--memory-worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from freetf import FreeTransformer, load_config
from freetf.config import Config, ModelConfig
from freetf.model.losses import LN2, HeadInputs, compute_loss
from freetf.training.optim import build_optimizer

MiB = 2**20
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: model overrides shared by every configuration, batch, length."""

    overrides: tuple[str, ...]
    batch_size: int
    seq_len: int

    def describe(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len,
                "overrides": list(self.overrides)}


# Issue 7, item 1: d=256, 8 layers, T=256, batch 8, vocab 256 (8 heads: the config default).
CPU_SHAPE = Shape(("model.hidden_dim=256", "model.num_layers=8", "model.num_heads=8",
                   "model.vocab_size=256", "model.max_seq_len=256"), batch_size=8, seq_len=256)
# Seconds-sized, for the test suite; the same H values, so the same JSON keys.
TINY_SHAPE = Shape(("model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2",
                    "model.vocab_size=32", "model.max_seq_len=32"), batch_size=2, seq_len=32)


def latent(h: int, *extra: str) -> tuple[str, ...]:
    """Overrides of one configuration: ``h = 0`` is the baseline."""
    return (f"model.latent_dim={h}", *extra)


def label(h: int) -> str:
    return "baseline" if h == 0 else f"ft_h{h}"


# ----------------------------------------------------------------------------- step


@dataclass
class TrainStep:
    """One training step: forward(mode="training") + compute_loss + backward + AdamW.

    The optimizer is ``freetf.training.optim.build_optimizer`` (the training loop's AdamW, decay
    groups included; ``optimizer.fused=auto`` is foreach on CPU and fused on CUDA).
    Targets are the next tokens: ``compute_loss(logits[:, :-1], z_logits[:, :-1],
    ids[:, 1:])``.  ``tokens`` counts the B x T input tokens of a step.
    """

    cfg: Config
    device: torch.device = CPU
    amp_dtype: torch.dtype | None = None
    set_to_none: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = FreeTransformer(self.cfg.model).to(self.device)
        self.model.train()
        self.module: torch.nn.Module = self.model  # replaced by a compiled wrapper on request
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        gen = torch.Generator().manual_seed(self.seed)
        b, t = self.cfg.training.batch_size, self.cfg.data.max_seq_len
        self.ids = torch.randint(0, self.cfg.model.vocab_size, (b, t), generator=gen
                                 ).to(self.device)  # (B, T)
        self.tokens = b * t
        self.kl_weight = self.cfg.training.kl_weight
        self.free_bits_nats = self.cfg.training.free_bits_nats

    def loss(self) -> torch.Tensor:
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else nullcontext())
        chunked = self.cfg.training.cross_entropy == "chunked"
        with amp:
            logits, z_logits = self.module(self.ids, mode="training", return_hidden=chunked)
            if chunked:  # training.cross_entropy: chunked, as the loop runs it
                logits = HeadInputs(logits, self.model.lm_head.weight,
                                    self.cfg.training.cross_entropy_chunk_tokens)
            total, _ = compute_loss(logits[:, :-1],
                                    None if z_logits is None else z_logits[:, :-1],
                                    self.ids[:, 1:], self.kl_weight, self.free_bits_nats)
        return total

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.set_to_none)

    def state_bytes(self) -> dict[str, int]:
        """Parameters, gradients (one per parameter) and AdamW state, in bytes."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                    for v in s.values() if torch.is_tensor(v))
        return {"params": params, "grads": params, "optimizer": state}


def step_overrides(shape: Shape, h: int, *extra: str, optimizer: str = "auto") -> list[str]:
    """Every override of one configuration at ``shape`` (also what a memory worker gets)."""
    return [*shape.overrides, *latent(h, *extra), f"optimizer.fused={optimizer}",
            f"training.batch_size={shape.batch_size}", f"data.max_seq_len={shape.seq_len}",
            "training.kl_weight=1.0", f"training.free_bits={LN2 / 2}"]


def step_config(shape: Shape, h: int, *extra: str, optimizer: str = "auto") -> Config:
    return load_config(overrides=step_overrides(shape, h, *extra, optimizer=optimizer))


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ``wall``: elapsed time.  ``cpu``: this process's CPU time, which a busy shared machine
# does not inflate by descheduling us; meaningful with one thread (``--threads 1``), where
# it is the compute time of the call (OpenMP threads waiting at a barrier would count).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    global _clock
    _clock = CLOCKS[name]


def timed(fn: Callable[[], Any], device: torch.device = CPU) -> float:
    """Seconds of one call on the chosen clock (the device synchronised before and after)."""
    synchronize(device)
    start = _clock()
    fn()
    synchronize(device)
    return _clock() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                device: torch.device = CPU) -> list[dict[str, float]]:
    """Run every function once per round, rotating the order each round.

    Returns one ``{name: seconds}`` per timed round, so that ratios can be taken within a
    round (the configurations of one round saw the same machine load) before the median.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    rounds = []
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        rounds.append({name: timed(fns[name], device) for name in order})
    return rounds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float | None:
    """a / b, or None (JSON null) where b is 0 (e.g. no measurable memory at --tiny)."""
    return a / b if b else None


def median_of(rounds: list[dict[str, float]], fn: Callable[[dict[str, float]], float]
              ) -> float:
    """Median over rounds of a per-round quantity (e.g. a ratio of two timings)."""
    return median([fn(r) for r in rounds])


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int
                ) -> tuple[Callable[[], Any], float]:
    """A square n x n matmul to time as the machine's peak, and its FLOPs (2 n^3)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


# ----------------------------------------------------------------------------- FLOPs


def block_matmul_params(m: ModelConfig) -> int:
    """Weights of one block's matmuls: q, k, v, o projections and the SwiGLU."""
    attn = m.hidden_dim * m.head_dim * (2 * m.num_heads + 2 * m.kv_heads)
    return attn + 3 * m.hidden_dim * m.ffn_dim


def step_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) per token, analytically.

    - ``dense``: 6 x matmul weights (2 forward + 4 backward per weight and token): the
      L decoder blocks and the LM head (d x V); the Free Transformer adds the encoder
      block and its readout (d x H).  Embedding gathers count 0.
    - ``attention``: 12 x T x d per attention block (QK^T and AV, 2 x 2 T d forward,
      3x for training), the PaLM convention: full T, not halved for causal masking.
      The encoder block is one more attention block.
    - ``mapper``: the exact chunked estimator (eq. 8) gathers W[d] forward (0 FLOPs);
      backward it forms s = dL/dr W^T over all 2^H codes (2 x 2^H x D), the code
      log-probabilities (two (N,H)x(H,2^H) products, 4 x H x 2^H) and
      sum_d s_d G_d U(d) (2 x H x 2^H): 2^H (2 D + 6 H).
    """
    d, h = m.hidden_dim, m.latent_dim
    blocks = m.num_layers + (1 if m.has_latent else 0)
    weights = blocks * block_matmul_params(m) + d * m.vocab_size + (d * h if h else 0)
    attn_dim = m.num_heads * m.head_dim
    parts = {
        "dense": 6.0 * weights,
        "attention": 12.0 * blocks * seq_len * attn_dim,
        "mapper": float(2**h * (2 * d + 6 * h)) if h and m.mapper == "exact" else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn`` as torch's FlopCounterMode counts them (matmuls; on CPU it does
    not count scaled_dot_product_attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module
                           ) -> int:
    """Bytes of the tensors autograd saves for backward during ``loss_fn()``, parameters
    excluded and storages counted once (deterministic; transient buffers not included).

    Checkpointed regions keep their own hooks, so this undercounts the inputs a
    non-reentrant checkpoint holds; the RSS figure includes them.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Activation memory of one training step, in this (fresh) process.

    Parameters, gradients and AdamW state are allocated by ``warmup`` real steps (with
    ``zero_grad(set_to_none=False)``, so the gradients stay allocated); then, per repeat,
    the peak-RSS mark is reset, RSS read, one step run, and the peak read again:
    activation memory = peak RSS during the step - RSS before it.
    """
    torch.set_num_threads(spec["threads"])
    step = TrainStep(load_config(overrides=spec["overrides"]), set_to_none=False)
    if spec["checkpointing"]:
        step.model.gradient_checkpointing_enable()
    resettable = _reset_peak_rss()
    if not resettable:  # no VmHWM reset: prime the state with an optimizer step on zeros
        for p in step.model.parameters():
            p.grad = torch.zeros_like(p)
        step.optimizer.step()
    else:
        for _ in range(spec["warmup"]):
            step()
    peaks = []
    for _ in range(spec["repeats"] if resettable else 1):
        if resettable:
            _reset_peak_rss()
            before = _proc_status_kib("VmRSS") * 1024
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = (_proc_status_kib("VmHWM") if resettable else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        peaks.append(peak - before)
    return {
        "activation_bytes": median(peaks),
        "activation_bytes_runs": peaks,
        "saved_tensor_bytes": saved_activation_bytes(step.loss, step.model),
        "method": "VmHWM reset" if resettable else "ru_maxrss after priming",
        **{f"{k}_bytes": v for k, v in step.state_bytes().items()},
    }


def activation_memory(overrides: Sequence[str], threads: int, repeats: int = 3,
                      warmup: int = 2, checkpointing: bool = False) -> dict[str, Any]:
    """Run ``memory_worker`` in a fresh Python process and return its result.

    ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB there, so glibc serves every tensor
    above it with its own mmap and returns it to the OS when freed (the default dynamic
    threshold would keep freed blocks on the heap): RSS then follows the live tensors.
    """
    spec = {"overrides": list(overrides), "threads": threads, "repeats": repeats,
            "warmup": warmup, "checkpointing": checkpointing}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def top_ops(step: Callable[[], Any], device: torch.device, steps: int = 2, rows: int = 12
            ) -> list[dict[str, float]]:
    """torch.profiler: the ops (CPU) or kernels (CUDA) with the most self time per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    # On CUDA, kernels only: an op's device time is also that of the kernels it launched.
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0 and (
        not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    return [{"op": e.key, "self_ms_per_step": getattr(e, attr) / 1e3 / steps,
             "share": getattr(e, attr) / total, "calls_per_step": e.count / steps}
            for e in events[:rows]]


def ops_table(ops: list[dict[str, float]], width: int = 60) -> str:
    return table(["op", "ms/step", "share %", "calls/step"],
                 [[o["op"][:width], o["self_ms_per_step"], 100 * o["share"],
                   o["calls_per_step"]] for o in ops])


# ----------------------------------------------------------------------------- output


def parser(description: str, repeats: int, memory: bool = False) -> argparse.ArgumentParser:
    """The flags every script shares; ``memory``: also ``--mem-repeats``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="seconds-sized shapes (tests)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: all cores)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time, or process CPU time (with --threads 1: immune to other "
                        "processes' load on a shared machine)")
    p.add_argument("--optimizer", choices=("auto", "fused", "foreach"), default="auto",
                   help="AdamW implementation (optimizer.fused; auto: foreach on CPU, "
                        "fused on CUDA, as the training loop)")
    if memory:
        p.add_argument("--mem-repeats", type=int, default=3,
                       help="measured steps per process (activation memory)")
    return p


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.clock == "cpu" and args.threads != 1:
        print("warning: --clock cpu counts every thread's CPU time (spin-waits included); "
              "use it with --threads 1", file=sys.stderr)


def environment() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = found.group(1) if found else cpu
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "clock": next(k for k, v in CLOCKS.items() if v is _clock),
           "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats with 3 significant digits."""
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
                return f"{v:.3g}"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [list(map(str, headers))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(name: str, args: argparse.Namespace, results: dict[str, Any], text: str,
           env_start: dict[str, Any]) -> None:
    """Print the table and write the JSON (command, environment before/after, results)."""
    print(text)
    print(f"torch threads {env_start['torch_threads']}, clock {env_start['clock']}; load "
          f"average (1, 5, 15 min) at start {env_start['load_average']}, at end "
          f"{list(os.getloadavg())}")
    if args.json is not None:
        payload = {"benchmark": name, "command": " ".join(["python", *sys.argv]),
                   "tiny": args.tiny, "repeats": args.repeats, "environment": env_start,
                   "load_average_end": list(os.getloadavg()), "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
    print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
