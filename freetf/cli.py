"""``freetf`` command line: train, generate, eval, export, sweep, reproduce, compare, report,
prepare, plan, wait-ray.

User mistakes (missing file, bad YAML, unknown key, corrupt checkpoint, a prompt outside
the vocabulary, an unreachable tracking server) end with a one-paragraph message and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from freetf.cli_types import (
    non_empty,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
)
from freetf.config import ConfigError, load_config
from freetf.logs import setup_console, setup_logging
from freetf.training.paths import OWN_FOLDER

CONFIG_HELP = ("a YAML config, or the name of a shipped one (tiny, synthetic, code, ...: "
               "freetf/configs/<name>.yaml); default: built-in defaults")


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    for flag, key in (("batch_size", "training.batch_size"),
                      ("learning_rate", "training.learning_rate"),
                      ("num_epochs", "training.num_epochs"),
                      ("max_steps", "training.max_steps"),
                      ("num_workers", "scaling.num_workers"),
                      ("strategy", "scaling.strategy")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.gpu:
        overrides += ["scaling.use_gpu=true", "training.device=cuda"]
    if args.no_ray:
        overrides.append("scaling.use_ray=false")
    from freetf.training.run_folder import with_default_run_name

    cfg = with_default_run_name(load_config(args.config, overrides), args.config)
    from freetf.training import ray_train
    from freetf.training.console import TrainConsole
    from freetf.training.loop import NonFiniteLossError
    from freetf.training.stop import TrainingStopped

    # After importing Ray and MLflow, which set their loggers' levels on import.
    setup_console(args.verbose, level=logging.WARNING)  # the console says what freetf's INFO would
    console = TrainConsole(verbose=args.verbose)
    summary = ray_train.run_training(cfg, resume=args.resume, fresh=args.fresh, console=console)
    if isinstance(summary.error, TrainingStopped):  # SIGTERM / SIGINT: 143 / 130
        print(f"freetf train: {summary.error.explain()}", file=sys.stderr)
        return summary.error.exit_code
    if isinstance(summary.error, NonFiniteLossError):
        print(f"freetf train: {summary.error.explain(console.cfg, summary.checkpoint)}",
              file=sys.stderr)
        return 1
    if summary.error is not None:
        raise summary.error
    console.summary(summary)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from freetf.training.export import load_inference_model, load_inference_tokenizer

    model, cfg, _ = load_inference_model(args.checkpoint)
    tokenizer = load_inference_tokenizer(args.checkpoint, cfg)
    try:
        ids = tokenizer.encode(args.prompt)
    except ValueError as err:
        raise UserError(f"--prompt: {err}") from None
    if not ids:
        raise UserError("--prompt is empty")
    _check_latent_code(args.z, cfg.model)
    max_new = _new_token_budget(args.max_new_tokens, len(ids), cfg)
    torch.manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples)
    try:
        out = model.generate(prompt, max_new, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, z=args.z)
    except ValueError as err:
        raise UserError(str(err)) from None
    for row in out.tolist():
        print(tokenizer.decode(row))
    return 0


def _check_latent_code(z: int | None, model_cfg) -> None:
    """``--z`` must name one of the model's 2^H codes."""
    if z is None:
        return
    if not model_cfg.has_latent:
        raise UserError("argument --z: this checkpoint is a baseline model (latent_dim=0); "
                        "it has no latent code to fix")
    codes = 2 ** model_cfg.latent_bits
    if not 0 <= z < codes:
        raise UserError(f"argument --z: {z} is outside [0, {codes}): the model's latent has "
                        f"{model_cfg.latent_bits} bits")


def _new_token_budget(requested: int | None, prompt_len: int, cfg) -> int:
    """``--max-new-tokens`` (default: up to data.max_seq_len), within the model's context."""
    room = cfg.model.max_seq_len - prompt_len
    if room < 1:
        raise UserError(f"argument --prompt: {prompt_len} tokens leave no room in the "
                        f"model's context of {cfg.model.max_seq_len} (model.max_seq_len)")
    if requested is None:
        return max(1, min(room, cfg.data.max_seq_len - prompt_len))
    if requested > room:
        raise UserError(f"argument --max-new-tokens: {requested} + the prompt's {prompt_len} "
                        f"tokens exceed the model's context of {cfg.model.max_seq_len}; use "
                        f"at most {room}")
    return requested


def _eval(args: argparse.Namespace) -> int:
    from freetf.data.datasets import build_data
    from freetf.training.evaluate import evaluate
    from freetf.training.export import load_inference_model

    model, cfg, step = load_inference_model(args.checkpoint)
    if args.set:
        cfg = cfg.replace(args.set)
    data = build_data(cfg)
    result = evaluate(model, data, cfg, next(model.parameters()).device,
                      cfg.training.free_bits_nats, samples=args.samples)
    result["step"] = step
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return 0
    for key, value in result.items():
        if isinstance(value, list):
            for text in value:
                print(f"  sample: {text}")
        elif isinstance(value, float):
            print(f"{key:<28} {value:.4f}")
        else:
            print(f"{key:<28} {value}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from freetf.training.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    except ExportError as err:
        raise UserError(str(err)) from None
    print(f"exported {args.checkpoint} to {out}: load it with "
          f"FreeTransformer.from_pretrained({str(out)!r}) or "
          f"freetf generate --checkpoint {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from freetf.data.prepare import PrepareError, PrepareSpec, prepare

    spec = PrepareSpec(inputs=tuple(args.inputs), tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                       seed=args.seed, text_field=args.text_field, shard_docs=args.shard_docs,
                       encoding_errors=args.encoding_errors)
    try:
        meta = prepare(spec, args.out, workers=args.workers, progress=not args.quiet)
    except PrepareError as err:
        raise UserError(str(err)) from None
    print(f"prepared {args.out}: vocabulary {meta['vocab_size']} ({meta['tokenizer']['kind']}), "
          f"{meta['dtype']}")
    for split, info in meta["splits"].items():
        print(f"  {split:<5} {info['documents']:>7} documents {info['tokens']:>11} tokens "
              f"{info['bytes']:>11} bytes ({info['bytes'] / max(info['tokens'], 1):.2f} "
              f"bytes/token)")
    print(f"train on it with: --set data.dataset_name=tokens --set data.path={args.out} "
          f"--set model.vocab_size={meta['vocab_size']}")
    return 0



def _plan(args: argparse.Namespace) -> int:
    from freetf.training.memory_plan import STRATEGIES, count_parameters, format_plan, memory_plan

    cfg = load_config(args.config, args.set or [])
    counts = count_parameters(cfg)
    plans = [memory_plan(cfg, args.num_workers, strategy, counts)
             for strategy in ([args.strategy] if args.strategy else STRATEGIES)]
    print(format_plan(cfg, plans, args.gpu_gib))
    return 0


def _report(args: argparse.Namespace) -> int:
    from freetf.results.report import ReportError
    from freetf.sweeps.reporting import report

    try:
        print(report(args.experiment, args.tracking_uri, args.out, args.sweep))
    except ReportError as err:
        raise UserError(str(err)) from None
    return 0


def _wait_ray(args: argparse.Namespace) -> int:
    from freetf.training.ray_ready import wait_for_job_agent

    try:
        waited = wait_for_job_agent(args.dashboard, args.agent, timeout_s=args.timeout)
    except TimeoutError as err:
        raise UserError(str(err)) from None
    print(f"Ray head at {args.dashboard} takes jobs (waited {waited:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freetf",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging (train: also Ray's and the workers' output)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (through Ray Train by default)")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--batch-size", type=positive_int, help="per-worker batch size")
    p.add_argument("--learning-rate", type=positive_float)
    p.add_argument("--num-epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--num-workers", type=non_negative_int,
                   help="Ray Train data-parallel workers (0: local mode, in the driver)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"),
                   help="ddp: a full model per worker; fsdp: sharded over the workers "
                   "(FSDP2; see `freetf plan`)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 AMP")
    p.add_argument("--no-ray", action="store_true", help="run the loop in-process")
    p.add_argument("--resume", type=non_empty, nargs="?", const=OWN_FOLDER,
                   metavar="CHECKPOINT",
                   help="continue the run: alone, from its own folder's latest checkpoint (as "
                   "a sweep's --resume; a run does this without the flag too, the flag says "
                   "so if there is nothing to continue); with a path, from that checkpoint "
                   "(or checkpoint root)")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a new folder beside the run's (NAME-2, NAME-3 ...), "
                   "keeping the old one as it is")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted config override, e.g. training.kl_weight=0.2 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="freetf's log, and Ray's and the workers' output")
    p.set_defaults(func=_train)

    checkpoint_help = "a checkpoint, a checkpoint root, or a folder from `freetf export`"
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, type=non_empty, help=checkpoint_help)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="default: fill the context up to data.max_seq_len")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=probability, help="nucleus sampling, in (0, 1]")
    p.add_argument("--num-samples", type=positive_int, default=4)
    p.add_argument("--z", type=non_negative_int,
                   help="one latent code in [0, 2^H) shared by every sample")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="latent diagnostics and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, type=non_empty, help=checkpoint_help)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--samples", action="store_true", help="also print generations")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="a checkpoint as safetensors + JSON "
                       "(FreeTransformer.from_pretrained; no pickle)")
    p.add_argument("--checkpoint", required=True, type=non_empty,
                   help="a checkpoint or checkpoint root: in-process, Ray Train or sharded")
    p.add_argument("--out", required=True, type=non_empty, help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_export)

    from freetf.commands import compare, reproduce, sweep

    for name, command in (("sweep", sweep), ("reproduce", reproduce), ("compare", compare)):
        p = sub.add_parser(name, help=command.HELP, description=command.HELP)
        command.add_arguments(p)
        p.set_defaults(func=command.run)

    p = sub.add_parser("report", help="collapse map of a sweep, from MLflow alone")
    p.add_argument("--experiment", required=True, type=non_empty)
    p.add_argument("--sweep", type=non_empty,
                   help="one sweep of the experiment (default: all its trials)")
    p.add_argument("--tracking-uri", type=non_empty)
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.set_defaults(func=_report)

    p = sub.add_parser("plan", help="memory per GPU under DDP and FSDP, from a config")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--num-workers", type=positive_int, default=1, help="GPUs (one a worker)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help="default: both, side by side")
    p.add_argument("--gpu-gib", type=positive_float,
                   help="GPU memory: add a row saying whether each plan fits")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_plan)

    from freetf.data.documents import ENCODING_ERRORS

    p = sub.add_parser("prepare", help="tokenize a corpus into training shards (+ meta.json)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folders, files, globs, .jsonl / .parquet files, hf:NAME[:SPLIT], or "
                   "'stdlib' (this Python's standard-library source)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte' (default), 'bpe' (byte-level BPE trained on the corpus), or "
                   "the path of a tokenizer.json")
    p.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary")
    p.add_argument("--val-fraction", type=open_fraction, default=0.05,
                   help="share of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet / HF text column")
    p.add_argument("--shard-docs", type=positive_int, default=256,
                   help="documents per shard (the unit of resumption)")
    p.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                   help="a file that is not UTF-8: skip it (strict, the default; it is named "
                   "in a summary) or keep it with U+FFFD for what does not decode (replace). "
                   "Binary files (NUL bytes) are skipped either way")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes encoding shards in parallel")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    from freetf.training.ray_ready import DEFAULT_AGENT, DEFAULT_DASHBOARD

    p = sub.add_parser("wait-ray", help="wait until a Ray head takes `ray job submit`")
    p.add_argument("--dashboard", default=DEFAULT_DASHBOARD, type=non_empty,
                   help=f"the head's dashboard (default {DEFAULT_DASHBOARD})")
    p.add_argument("--agent", default=DEFAULT_AGENT, type=non_empty,
                   help=f"the head's dashboard agent (default {DEFAULT_AGENT})")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds")
    p.set_defaults(func=_wait_ray)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    from freetf.model.pretrained import PretrainedError
    from freetf.tracking import TrackingError
    from freetf.training.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (UserError, ConfigError, CheckpointError, PretrainedError, TrackingError,
            FileNotFoundError) as err:
        print(f"freetf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"freetf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
