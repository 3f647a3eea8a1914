"""The config tree's schema: one frozen dataclass per section, and their checks.

Every error names the key's full dotted path and the offending value.  Configs are
frozen after loading: derived values are properties, never mutations.

Units: ``training.free_bits`` is in **nats per token** (the guide's unit);
``training.free_bits_bits`` is the same threshold in bits and, when set, wins.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from freetf.config.tree import _fail, _to_plain, apply_overrides, build_section

LN2 = math.log(2.0)
# model.vocab_size when a config leaves it out: the vocabulary of its data (the synthetic
# task's 29 symbols, bytes for text and token files).  freetf.data checks the match.
DATA_VOCAB_SIZES = {"synthetic": 29, "text": 256, "tokens": 256}
# Largest H for which the exact (eq. 8) mapper is allowed: its post-sampler holds a
# (2^H, D) weight, 2^20 x 512 fp32 is already 2 GiB.
MAX_EXACT_LATENT_BITS = 20


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    # Left out of a YAML config: the data's vocabulary (DATA_VOCAB_SIZES; 29 for the
    # default synthetic task, 256 for bytes).
    vocab_size: int = DATA_VOCAB_SIZES["synthetic"]
    hidden_dim: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    ffn_hidden_dim: int | None = None  # None = SwiGLU default (8/3 d, multiple of 64)
    latent_dim: int = 16  # H, number of latent bits; 0 = baseline decoder
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    injection_layer: int | None = None  # blocks before the encoder; None = num_layers // 2
    mapper: Literal["exact", "factored"] = "exact"
    mapper_impl: Literal["chunked", "dense"] = "chunked"  # both exact (eq. 8)
    mapper_chunk_size: int = 0  # codes per chunk in the chunked backward; 0 = auto
    # Precision of the chunked backward's s = dL/dr W^T products over the 2^H codes:
    # fp32 (exact), or the autocast dtype when training under AMP (bf16 tensor cores on
    # GPU; G and every sum stay fp32).  An opt-in speed/precision trade.
    mapper_score_precision: Literal["fp32", "autocast"] = "fp32"
    init_std: float = 0.02
    # Initial point of the post-sampler table (BinaryMapper.reset_weight): "normal" (the
    # default), "zero", or "bits" (inside the factored family; the table stays 2^H x D).
    post_sampler_init: Literal["normal", "zero", "bits"] = "normal"
    post_sampler_init_std: float = 0.02
    readout_init_std: float | None = None  # encoder readout weights; None = init_std

    @property
    def latent_bits(self) -> int:
        return self.latent_dim

    @property
    def has_latent(self) -> bool:
        return self.latent_dim > 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        return 64 * math.ceil(8 * self.hidden_dim / 3 / 64)

    @property
    def encoder_after(self) -> int:
        """Number of decoder blocks run before the encoder reads the stream (B/2)."""
        return self.num_layers // 2 if self.injection_layer is None else self.injection_layer

    def validate(self, path: str) -> None:
        _positive(self, path, "vocab_size", "hidden_dim", "num_layers", "num_heads",
                  "max_seq_len")
        _non_negative(self, path, "mapper_chunk_size", "post_sampler_init_std")
        if self.readout_init_std is not None and self.readout_init_std < 0:
            _fail(f"{path}.readout_init_std", self.readout_init_std, "must be >= 0")
        if self.hidden_dim % self.num_heads:
            _fail(f"{path}.num_heads", self.num_heads,
                  f"must divide {path}.hidden_dim={self.hidden_dim}")
        if self.head_dim % 2:
            _fail(f"{path}.num_heads", self.num_heads,
                  f"gives an odd head dim {self.head_dim}; RoPE needs it even")
        if self.num_kv_heads is not None and (
                self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            _fail(f"{path}.num_kv_heads", self.num_kv_heads,
                  f"must be positive and divide {path}.num_heads={self.num_heads}")
        if self.latent_dim < 0:
            _fail(f"{path}.latent_dim", self.latent_dim, "must be >= 0 (0 = baseline)")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"{path}.dropout", self.dropout, "must be in [0, 1)")
        if self.injection_layer is not None and not 0 <= self.injection_layer < self.num_layers:
            _fail(f"{path}.injection_layer", self.injection_layer,
                  f"must be in [0, num_layers={self.num_layers})")
        if self.mapper == "exact" and self.latent_dim > MAX_EXACT_LATENT_BITS:
            _fail(f"{path}.latent_dim", self.latent_dim,
                  f"is too large for the exact binary mapper (its post-sampler has "
                  f"2^{self.latent_dim} rows); use {path}.mapper=factored, or "
                  f"latent_dim <= {MAX_EXACT_LATENT_BITS}")


@dataclass(frozen=True)
class KLAnnealingConfig:
    type: Literal["constant", "linear", "cosine", "cyclical"] = "constant"
    initial_weight: float = 0.0  # linear/cosine start; cyclical low end
    warmup_steps: int = 0  # linear/cosine: steps to reach training.kl_weight
    cycles: int = 4  # cyclical: number of cycles over the run
    ratio: float = 0.5  # cyclical: fraction of each cycle spent increasing

    def validate(self, path: str) -> None:
        _non_negative(self, path, "initial_weight", "warmup_steps")
        _positive(self, path, "cycles")
        if not 0.0 < self.ratio <= 1.0:
            _fail(f"{path}.ratio", self.ratio, "must be in (0, 1]")


@dataclass(frozen=True)
class FreeBitsScheduleConfig:
    """kappa from a start value to ``training.free_bits`` (the guide's ``get_free_bits``);
    the start is named like the end: ``initial_free_bits`` in nats, or
    ``initial_free_bits_bits`` in bits (wins when set)."""

    RENAMED: ClassVar[dict[str, str]] = {"initial_nats": "initial_free_bits"}
    type: Literal["constant", "linear", "cosine"] = "constant"
    initial_free_bits: float | None = None  # nats; None: no ramp (training.free_bits)
    initial_free_bits_bits: float | None = None  # the same start in bits
    steps: int = 0  # steps to reach training.free_bits (0 = whole run)

    @property
    def initial_nats(self) -> float | None:
        """The start in nats per token (None: no ramp)."""
        if self.initial_free_bits_bits is not None:
            return self.initial_free_bits_bits * LN2
        return self.initial_free_bits

    def validate(self, path: str) -> None:
        _non_negative(self, path, "initial_free_bits", "initial_free_bits_bits", "steps")


@dataclass(frozen=True)
class CurriculumPhase:
    until_step: int
    max_seq_len: int | None = None
    kl_weight: float | None = None

    def validate(self, path: str) -> None:
        _positive(self, path, "until_step", "max_seq_len")
        _non_negative(self, path, "kl_weight")


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8  # per data-parallel worker
    learning_rate: float = 3e-4
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when set
    warmup_steps: int = 100
    weight_decay: float = 0.01
    kl_weight: float = 1.0
    free_bits: float = LN2 / 2  # nats per token (the guide's unit)
    free_bits_bits: float | None = None  # same threshold in bits; wins when set
    # token: eq. 5, each token's KL hinged at kappa (the paper); sequence: an ablation, the
    # KL summed over a sequence's tokens hinged at T kappa (tokens may pool their budget)
    free_bits_per: Literal["token", "sequence"] = "token"
    grad_clip: float = 1.0  # 0 = off
    grad_accum_steps: int = 1
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    gradient_checkpointing: bool = False
    compile: bool = False
    # chunked: linear + cross-entropy one chunk of tokens at a time, never holding the
    # (B, T, V) fp32 logits (same loss and gradients; a speed/memory option, off by default)
    cross_entropy: Literal["plain", "chunked"] = "plain"
    cross_entropy_chunk_tokens: int = 0  # tokens per chunk; 0 = sized automatically
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    max_consecutive_nonfinite: int = 5
    kl_annealing: KLAnnealingConfig = field(default_factory=KLAnnealingConfig)
    free_bits_schedule: FreeBitsScheduleConfig = field(default_factory=FreeBitsScheduleConfig)
    curriculum: list[CurriculumPhase] = field(default_factory=list)
    fail_at_step: int | None = None  # testing aid: raise once at this step (fault injection)

    @property
    def free_bits_nats(self) -> float:
        if self.free_bits_bits is not None:
            return self.free_bits_bits * LN2
        return self.free_bits

    def validate(self, path: str) -> None:
        _positive(self, path, "batch_size", "learning_rate", "num_epochs", "max_steps",
                  "grad_accum_steps", "log_every", "eval_batches",
                  "max_consecutive_nonfinite")
        _non_negative(self, path, "warmup_steps", "weight_decay", "kl_weight", "free_bits",
                      "free_bits_bits", "grad_clip", "eval_every", "cross_entropy_chunk_tokens")
        self.kl_annealing.validate(f"{path}.kl_annealing")
        self.free_bits_schedule.validate(f"{path}.free_bits_schedule")
        last = 0
        for i, phase in enumerate(self.curriculum):
            phase.validate(f"{path}.curriculum[{i}]")
            if phase.until_step <= last:
                _fail(f"{path}.curriculum[{i}].until_step", phase.until_step,
                      "phases must end at increasing steps")
            last = phase.until_step


@dataclass(frozen=True)
class OptimizerConfig:
    type: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    fused: Literal["auto", "fused", "foreach", "off"] = "auto"
    # The post-sampler's 2^H rows are trained only when their code is sampled: a multiple
    # of the learning rate for them alone (its own param group when != 1).
    post_sampler_lr_mult: float = 1.0

    def validate(self, path: str) -> None:
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                _fail(f"{path}.betas[{i}]", beta, "must be in [0, 1)")
        _positive(self, path, "eps", "post_sampler_lr_mult")


@dataclass(frozen=True)
class SchedulerConfig:
    type: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 1e-6

    def validate(self, path: str) -> None:
        _non_negative(self, path, "min_lr")


@dataclass(frozen=True)
class DataConfig:
    dataset_name: Literal["synthetic", "text", "tokens"] = "synthetic"
    path: str | None = None  # text: file or folder; tokens: a .bin token file
    max_seq_len: int = 66
    num_workers: int = 0  # DataLoader workers per training worker
    num_samples: int = 20000  # synthetic: training sequences
    val_samples: int = 512  # synthetic: validation sequences
    val_fraction: float = 0.05  # text/tokens: held-out fraction
    seed: int = 0

    def validate(self, path: str) -> None:
        _positive(self, path, "max_seq_len", "num_samples", "val_samples")
        _non_negative(self, path, "num_workers")
        if not 0.0 < self.val_fraction < 1.0:
            _fail(f"{path}.val_fraction", self.val_fraction, "must be in (0, 1)")
        if self.dataset_name in ("text", "tokens") and not self.path:
            _fail(f"{path}.path", self.path,
                  f"is required when {path}.dataset_name={self.dataset_name!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = 0  # 0 = only at the end
    keep: int = 3
    metric: str = "eval/ce_prior_nats"  # Ray CheckpointConfig: keep the best by this
    mode: Literal["min", "max"] = "min"

    def validate(self, path: str) -> None:
        _non_negative(self, path, "every_steps")
        _positive(self, path, "keep")
        if self.metric != "step" and not self.metric.startswith(("train/", "eval/")):
            _fail(f"{path}.metric", self.metric, "must be a logged metric: 'step', "
                  "'train/...' or 'eval/...' (e.g. eval/ce_prior_nats)")


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = "freetf"
    run_name: str | None = None


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = False
    log_dir: str = "runs"


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "free-transformer"
    mode: Literal["online", "offline", "disabled"] = "offline"


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class ScalingConfig:
    use_ray: bool = True  # False: in-process loop (debugging, tests)
    num_workers: int = 1  # 0 = Ray Train's local mode (the loop in the driver process)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # ddp: every worker holds the whole model, its gradients and AdamW's state.  fsdp:
    # FSDP2 (fully_shard) shards them over the workers (freetf/training/parallel.py);
    # checkpoints are then sharded (torch.distributed.checkpoint).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp_cpu_offload: bool = False  # fsdp: parameters, gradients, AdamW state on the CPU
    # Ray's placement of the workers: PACK fills a node first, SPREAD puts them on
    # different nodes where it can (both fall back to what the cluster has)
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    max_failures: int = 0
    storage_path: str = "ray_results"  # shared storage on multi-node clusters
    run_name: str | None = None
    # Least seconds between two metric-only ray.train.report calls (see ray_train.py);
    # eval, checkpoint and final results always go through.  0: every log step.
    report_interval_s: float = 2.5

    def validate(self, path: str) -> None:
        _positive(self, path, "cpus_per_worker")
        _non_negative(self, path, "num_workers", "gpus_per_worker", "max_failures",
                      "report_interval_s")


@dataclass(frozen=True)
class DiagnosticsConfig:
    active_bit_threshold_nats: float = 0.01  # KL_h above this counts as an active bit
    collapsed_kl_nats: float = 0.01  # raw KL per token under this ...
    collapsed_gap_nats: float = 0.01  # ... and prior-posterior CE gap under this
    leak_kl_factor: float = 2.0  # raw KL above factor * free_bits ...
    leak_gap_nats: float = 0.5  # ... or CE gap above this = leaking
    # Synthetic task: free generations (Z from the prior) read for validity at the final
    # evaluation (eval/valid_rate, with its Wilson interval); 0 = off.
    free_generations: int = 256
    # Use of Z (freetf.evaluation.latent_use): posterior redraws per row for the shuffle
    # gain eval/use_nats (0 = not measured), prior draws of the importance-weighted
    # honest bound eval/ce_iw_nats.
    use_redraws: int = 2
    iw_prior_draws: int = 4
    # Sweep verdicts (freetf.evaluation.verdicts), tolerances fixed in advance:
    # used: the use interval lies above use_tol_nats (nats per token);
    # leaking: the validity interval lies leak_valid_tol below the baseline's, or the
    # validity is below broken_valid; without validity (real data), the honest bound's
    # interval lies leak_cost_tol_nats above the baseline's CE.
    use_tol_nats: float = 0.002
    leak_valid_tol: float = 0.1
    broken_valid: float = 0.2
    leak_cost_tol_nats: float = 0.02
    # What Z encodes (synthetic task): a class of tokens (position, noise) counts when
    # its use interval lies above regime_tol_nats per token of the class.
    regime_tol_nats: float = 0.05
    # A trial is converged when its last converge_evals evaluations agree: posterior CE
    # within converge_ce_nats and KL within the larger of converge_kl_bits and
    # converge_kl_frac of kappa (max - min; under its cap the KL moves freely); a
    # synthetic baseline also needs its CE within floor_tol_nats of the exact floor.
    converge_evals: int = 3
    converge_ce_nats: float = 0.005
    converge_kl_bits: float = 0.1
    converge_kl_frac: float = 0.15
    floor_tol_nats: float = 0.01
    # The earlier seed-spread rule's margin (in noise units); kept for old configs only.
    noise_z: float = 2.0

    def validate(self, path: str) -> None:
        _non_negative(self, path, "active_bit_threshold_nats", "collapsed_kl_nats",
                      "collapsed_gap_nats", "leak_kl_factor", "leak_gap_nats",
                      "free_generations", "noise_z", "use_redraws", "use_tol_nats",
                      "leak_valid_tol", "broken_valid", "leak_cost_tol_nats",
                      "converge_ce_nats", "converge_kl_bits", "converge_kl_frac",
                      "floor_tol_nats",
                      "regime_tol_nats")
        _positive(self, path, "iw_prior_draws", "converge_evals")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.data.max_seq_len > self.model.max_seq_len:
            _fail("data.max_seq_len", self.data.max_seq_len,
                  f"exceeds model.max_seq_len={self.model.max_seq_len}")
        for i, phase in enumerate(self.training.curriculum):
            if phase.max_seq_len and phase.max_seq_len > self.data.max_seq_len:
                _fail(f"training.curriculum[{i}].max_seq_len", phase.max_seq_len,
                      f"exceeds data.max_seq_len={self.data.max_seq_len}")
        if self.scaling.strategy == "fsdp":
            _check_fsdp(self)
        if self.data.dataset_name != "synthetic" and self.model.vocab_size < 256:
            _fail("model.vocab_size", self.model.vocab_size,
                  "must be >= 256 for byte-level text data")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: list[str] | dict[str, Any]) -> Config:
        """A new validated config with dotted overrides applied (``model.vocab_size`` is
        in ``to_dict()``: there is no default to fill in, unlike ``from_dict``)."""
        config = build_section(Config, apply_overrides(self.to_dict(), overrides, Config), "")
        config.validate()
        return config


def _check_fsdp(cfg: Config) -> None:
    """scaling.strategy=fsdp shards over a process group: Ray Train workers, bf16 or fp32."""
    if not cfg.scaling.use_ray:
        _fail("scaling.strategy", "fsdp", "needs the distributed path: set "
              "scaling.use_ray=true (or scaling.strategy=ddp)")
    if cfg.scaling.num_workers < 1:
        _fail("scaling.strategy", "fsdp", "needs Ray Train workers: set "
              "scaling.num_workers >= 1 (0 is the local mode, with no process group)")
    if cfg.training.amp == "fp16":
        _fail("training.amp", "fp16", "is not supported with scaling.strategy=fsdp "
              "(no sharded gradient scaler); use training.amp=bf16")
    if cfg.scaling.fsdp_cpu_offload and cfg.optimizer.fused == "fused":
        _fail("optimizer.fused", "fused", "cannot step parameters offloaded to the CPU "
              "(scaling.fsdp_cpu_offload=true); use optimizer.fused=auto")


def _positive(section: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            _fail(f"{path}.{name}", value, "must be > 0")


def _non_negative(section: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            _fail(f"{path}.{name}", value, "must be >= 0")
