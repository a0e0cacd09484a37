"""The pretraining loop: warmup + cosine schedule, grad clipping and accumulation, optional bf16
autocast, periodic validation, atomic checkpoints with exact resume, a progress bar, and a run
directory with the resolved config, metrics as JSONL and a summary. Runs alone or under torchrun
(DDP, or FSDP2 with ``--fsdp``; see :mod:`adapm.train.parallel`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import adapm
from adapm.train import parallel, registry
from adapm.train.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, signals_deferred
from adapm.train.config import OptimConfig, PretrainConfig, TrainConfig
from adapm.train.data import TokenData, get_batch, prepare_data
from adapm.train.models import build_model, count_parameters, load_pretrained
from adapm.train.optimizers import build_optimizer

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_DCP = "checkpoint_dcp"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class WarmupCosine:
    """Learning-rate factor: linear warmup, then cosine decay to ``min_ratio`` at ``total`` steps.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` records it and checkpoints stay
    loadable with ``weights_only=True``.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux the high-water mark of this process's own memory (``VmHWM``): ``getrusage``'s
    ``ru_maxrss`` survives ``exec``, so a run that ``adapm compare`` starts would report the parent's
    peak wherever that is higher. Elsewhere ``ru_maxrss`` (bytes on macOS, kB on other systems), and 0
    where neither exists (Windows).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def default_threads() -> int:
    """All cores, or one per process under torchrun (as torchrun's OMP_NUM_THREADS=1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    return os.cpu_count() or 1


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, cfg: PretrainConfig, device: torch.device | None = None) -> float:
    """Mean loss over ``eval_batches`` fixed validation batches (the same for every run, optimizer and rank)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.train.eval_batches):
        x = get_batch(data.val, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed, -1, i)
        if device is not None:
            x = x.to(device)
        with autocast(cfg.train.bf16, device):
            losses.append(model(input_ids=x, labels=x).loss.double())
    model.train(was_training)
    return torch.stack(losses).mean().item()  # one read of the device for all batches


def autocast(bf16: bool, device: torch.device | None = None) -> Any:
    """bf16 autocast when ``bf16``, else nothing."""
    device_type = device.type if device is not None else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _build_model(cfg: PretrainConfig, data: TokenData) -> nn.Module:
    if cfg.model.init_from is not None:
        model = load_pretrained(cfg.model.init_from)
        n_vocab = model.get_input_embeddings().weight.shape[0]
        if n_vocab < data.vocab_size:
            raise ValueError(
                f"--init-from model has {n_vocab} embeddings but the tokenizer has {data.vocab_size} tokens; "
                "pass the model's own tokenizer with --tokenizer"
            )
        return model
    eos = data.tokenizer.eos_token_id if data.tokenizer is not None else None
    return build_model(cfg.model.model, data.vocab_size, cfg.data.seq_len, eos_token_id=eos)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


@dataclass
class StepResult:
    """What one micro-batch of a task gives the loop."""

    loss: torch.Tensor
    """The loss to differentiate (the loop divides it by ``grad_accum``)."""
    tokens: int
    """Tokens this micro-batch trained on (for tokens/s)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra per-step numbers to log (averaged over micro-batches and ranks), e.g. RLHF's reward."""


@dataclass
class Task:
    """One kind of training (pretraining, fine-tuning, RLHF) as the shared loop sees it.

    The loop owns everything else: seeding, DDP/FSDP2 wrapping, the optimizer and schedule, gradient
    accumulation and clipping, metrics, checkpoints with exact resume, the progress bar and the summary.
    """

    kind: str
    """"pretrain", "sft" or "rlhf" (recorded in the summary)."""
    model_name: str
    """What the summary calls the model (a preset or a directory)."""
    build_model: Callable[[], nn.Module]
    """Builds the model to train (called after the seed is set)."""
    step: Callable[[nn.Module, int, int], StepResult]
    """``step(model, step, micro)``: forward one micro-batch of training step ``step``."""
    evaluate: Callable[[nn.Module], dict[str, float]]
    """Held-out metrics of the current model; must contain ``primary``."""
    primary: str = "val_loss"
    """The headline held-out metric."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config, written to config.json (the loop adds ``derived`` facts)."""
    derived: dict[str, Any] = field(default_factory=dict)
    """Facts about the run to record in config.json and the summary (vocabulary, baselines...)."""
    save_extra: Callable[[Path], None] | None = None
    """Writes what belongs beside the saved model (the tokenizer)."""
    eval_at_start: bool = False
    """Also evaluate before the first step (fine-tuning: the starting point is the baseline)."""


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.optim``; returns (and writes) the run summary.

    Under torchrun every rank calls this; the model is wrapped in DDP, or sharded with FSDP2 when
    ``cfg.train.fsdp``; rank 0 writes the run directory.
    """
    return launch(lambda par: pretrain_task(cfg, prepare_data(cfg.data), par), cfg.optim, cfg.train)


def launch(task_of: Callable[[parallel.Parallel], Task], optim: OptimConfig, tc: TrainConfig) -> dict[str, Any]:
    """Join the torchrun job if there is one, build the task with ``task_of(par)`` and :func:`run` it.

    Rank 0 builds first, then the other ranks: it fills the caches (token ids, a converted model) that
    they then read. ``task_of`` must not communicate with the other ranks.
    """
    par = parallel.setup()
    try:
        torch.set_num_threads(tc.threads or default_threads())
        refuse_overwrite(tc, par)
        if not par.is_main:
            par.barrier()
        task = task_of(par)
        if par.is_main:
            par.barrier()
        return run(task, optim, tc, par)
    finally:
        parallel.teardown(par)


def pretrain_task(cfg: PretrainConfig, data: TokenData, par: parallel.Parallel) -> Task:
    """Pretraining as a :class:`Task`: random token windows of the corpus."""
    tc = cfg.train

    def step(model: nn.Module, step: int, micro: int) -> StepResult:
        key = (step, micro) if not par.enabled else (step, micro, par.rank)
        x = get_batch(data.train, tc.batch_size, cfg.data.seq_len, tc.seed, *key).to(par.device)
        with autocast(tc.bf16, par.device):
            loss = model(input_ids=x, labels=x).loss
        return StepResult(loss, x.numel())

    return Task(
        kind="pretrain",
        model_name=cfg.model.init_from or cfg.model.model,
        build_model=lambda: _build_model(cfg, data),
        step=step,
        evaluate=lambda model: {"val_loss": evaluate(model, data, cfg, par.device)},
        config=cfg.to_dict(),
        derived={"vocab_size": data.vocab_size, "unigram_val_loss": data.unigram_loss()},
        save_extra=data.tokenizer.save_pretrained if data.tokenizer is not None else None,
    )


RESUME_FREE_KEYS = frozenset(
    {
        "out",
        "data.cache_dir",
        "model.cache_dir",
        "train.out_dir",
        "train.resume",
        "train.extend",
        "train.overwrite",
        "train.progress",
        "train.stop_at",
        "train.eval_every",
        "train.eval_batches",
        "train.log_every",
        "train.checkpoint_every",
        "train.save_model",
        "train.threads",
        "train.max_bad_steps",
        "train.report_to",
    }
)
"""Config keys that may change on --resume: they do not change the trajectory of the weights."""


def refuse_overwrite(tc: TrainConfig, par: parallel.Parallel) -> None:
    """An existing run without ``resume`` is an error (nothing gets overwritten), unless ``overwrite``
    asks to delete it and start over."""
    out = Path(tc.out_dir)
    ckpt_path = out / (CHECKPOINT_DCP if par.enabled and tc.fsdp else CHECKPOINT)
    if not ckpt_path.exists() or tc.resume:
        return
    if not tc.overwrite:
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to delete it and start over, "
            "or choose another output directory (nothing was overwritten)"
        )
    par.barrier()
    if par.is_main:
        for name in (CHECKPOINT, CHECKPOINT_DCP, METRICS, SUMMARY, "config.json", "model"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    par.barrier()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], done: int, tc: TrainConfig) -> None:
    """Refuse to resume when a setting that changes the trajectory differs from the checkpoint's run.

    ``train.steps`` may grow only with ``extend`` (the schedule then stays the original one).

    Raises:
        ValueError: naming every differing key with both values.
    """
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(current)
    # Settings a newer version added (absent from the checkpoint's record) are not compared.
    differ = sorted(k for k in old if k not in RESUME_FREE_KEYS and old[k] != new.get(k))
    if "train.steps" in differ and tc.extend and new["train.steps"] > old.get("train.steps", 0):
        differ.remove("train.steps")
    if differ:
        details = ", ".join(f"{k} is {old.get(k)!r} in the checkpoint but {new.get(k)!r} now" for k in differ)
        hint = ""
        if "train.steps" in differ and new.get("train.steps", 0) > old.get("train.steps", 0):
            hint = "; to train a finished or shorter run for more steps, add --extend"
        raise ValueError(
            f"--resume: settings that change the training differ from the run in {tc.out_dir}: {details}{hint}. "
            "Resume with the original values, or start a new run in another output directory"
        )


@dataclass
class _Progress:
    """What the loop carries between steps (and across a resume)."""

    start: int = 0
    elapsed: float = 0.0
    tokens: int = 0
    initial: dict[str, Any] = field(default_factory=dict)
    saved_config: dict[str, Any] | None = None
    schedule_steps: int = 0


def _load(r: _Run) -> _Progress:
    """Restore the model, optimizer, schedule and RNG from the run's checkpoint; returns where it was."""
    if r.sharded:
        extra = parallel.dcp_load(r.ckpt_path, r.model, r.optimizer, _extra_template(r.scheduler))
    else:
        extra = load_checkpoint(r.ckpt_path)
        parallel.unwrap(r.model).load_state_dict(extra["model"])
        r.optimizer.load_state_dict(extra["optimizer"])
    r.scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    saved = extra.get("config") or None
    lambdas = r.scheduler.lr_lambdas
    return _Progress(
        start=int(extra["step"]),
        elapsed=float(extra["elapsed"]),
        tokens=int(extra.get("tokens", 0)),
        initial=json.loads(extra.get("initial", "{}")),
        saved_config=json.loads(saved) if saved else None,
        schedule_steps=int(getattr(lambdas[0], "total", 0)) if lambdas else 0,
    )


def _read_summary(out: Path, steps: int) -> dict[str, Any] | None:
    """The summary of a finished run of ``steps`` steps in ``out``, if one is there and readable."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == steps else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics_history(path: Path) -> tuple[float | None, list[float]]:
    """The last training loss and every tokens/s figure logged in ``metrics.jsonl``."""
    records = read_metrics(path)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    return (losses[-1] if losses else None), [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


class Reporter:
    """Sends every metrics line to TensorBoard or (offline) Weights & Biases as well as metrics.jsonl."""

    def __init__(self, kind: str, out: Path, start: int, config: dict[str, Any]) -> None:
        self.kind = kind
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                message = "--report-to tensorboard needs the tensorboard package (pip install tensorboard)"
                raise ValueError(message) from exc
            # purge_step: a resumed run hides the events a killed run wrote after its checkpoint.
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", start)
        else:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError("--report-to wandb needs the wandb package: pip install wandb") from exc
            self.writer = wandb.init(mode="offline", dir=str(out), config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        else:
            self.writer.log(values, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


class TrainingStopped(RuntimeError):
    """The loss or the gradients went non-finite for good: the run stops, its last checkpoint intact."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``): handled as Ctrl-C is, with the last checkpoint intact."""


@dataclass
class _Run:
    """A training run's fixed parts, as :func:`run` sets them up."""

    task: Task
    optim: OptimConfig
    """With its learning rate resolved."""
    tc: TrainConfig
    par: parallel.Parallel
    model: nn.Module
    optimizer: Any
    scheduler: Any
    n_params: int
    lr_source: str
    config: dict[str, Any]
    """The run's settings as the checkpoint records them (a resume must match them)."""
    out: Path
    sharded: bool
    ckpt_path: Path


@dataclass
class _Tally:
    """The running totals of a run (a resume starts from the checkpoint's)."""

    elapsed: float = 0.0
    tokens: int = 0
    train_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Window:
    """What the loop keeps between its reads of the device. Steps run without waiting for the device;
    it is read at log steps, evaluations and checkpoints (:func:`_read`), for the last step's loss, the
    tokens, and the health counts (kept on the device in between)."""

    start: float = field(default_factory=time.perf_counter)
    """When the steps that the next metrics line's tokens/s covers began."""
    tokens: int = 0
    """Tokens (all ranks) read since the last metrics line."""
    skipped_from: int = 0
    """The optimizer's ``skipped_total`` at the last metrics line."""
    unread_tokens: int = 0
    """This rank's tokens since the last read."""
    loss: torch.Tensor | None = None
    """The last step's loss, on the device."""
    bad_losses: torch.Tensor | None = None
    """Steps in a row (up to the last) whose loss was not finite, on the device."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last step's task metrics (this rank's)."""

    def add(self, loss: torch.Tensor, tokens: int, metrics: dict[str, float]) -> None:
        """One step's results, kept without reading the device."""
        bad = self.bad_losses if self.bad_losses is not None else torch.zeros((), device=loss.device)
        self.bad_losses = torch.where(torch.isfinite(loss), 0.0, bad + 1)
        self.loss, self.metrics = loss, metrics
        self.unread_tokens += tokens

    def pause(self, since: float) -> None:
        """Leave the time since ``since`` (an evaluation, a checkpoint) out of tokens/s."""
        self.start += time.perf_counter() - since


def run(task: Task, optim: OptimConfig, tc: TrainConfig, par: parallel.Parallel) -> dict[str, Any]:
    """The shared training loop: train ``task`` with ``optim`` for ``tc.steps``; returns the summary
    (also written to ``tc.out_dir/summary.json`` by rank 0), or ``{"stopped_at": step}`` at ``tc.stop_at``.

    Resuming a finished run changes no file and returns its summary. Called by :func:`launch`, which
    has already refused to overwrite an existing run.

    Raises:
        TrainingStopped: the loss stayed non-finite, or every parameter was skipped, for
            ``tc.max_bad_steps`` steps (or the validation loss was non-finite).
        ValueError: ``--resume`` with settings that differ from the checkpoint's run.
    """
    r = _setup(task, optim, tc, par)
    progress_state = _Progress(schedule_steps=tc.steps)
    if tc.resume and r.ckpt_path.exists():
        progress_state = _load(r)
        check_resume(progress_state.saved_config, r.config, progress_state.start, tc)
        if progress_state.start >= tc.steps:
            finished = _read_summary(r.out, tc.steps)
            if finished is not None:
                return finished  # nothing left to do: every file stays as it was
    elif par.is_main:
        for stale in (METRICS, SUMMARY):  # left by a run killed before its first checkpoint
            (r.out / stale).unlink(missing_ok=True)
    resolved = _resolved_config(r, progress_state)
    if par.is_main:
        r.out.mkdir(parents=True, exist_ok=True)
        if progress_state.start > 0:
            _truncate_metrics(r.out / METRICS, progress_state.start)
        (r.out / "config.json").write_text(json.dumps(resolved, indent=2))
    return _train(r, progress_state, resolved)


def _setup(task: Task, optim: OptimConfig, tc: TrainConfig, par: parallel.Parallel) -> _Run:
    """Build the model (seeded), the optimizer with its resolved lr, and the warmup-cosine schedule."""
    out = Path(tc.out_dir)
    sharded = par.enabled and tc.fsdp
    if par.is_main:
        remove_stale_temporaries(out)
    torch.manual_seed(tc.seed)
    base = task.build_model().to(par.device)
    n_params = count_parameters(base)
    base.train()
    model = parallel.wrap(base, par, tc.fsdp)
    if optim.lr is None:  # swept for the model preset where the lr table has it, else the registry's
        lr, lr_source = registry.lr_with_source(
            optim.optimizer, task.kind != "pretrain", task.model_name, blockwise=optim.lr_ratios is not None
        )
        optim = dataclasses.replace(optim, lr=lr)
    else:
        lr_source = "--lr"
    optimizer = build_optimizer(parallel.unwrap(model), optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(_warmup(tc), tc.steps, tc.min_lr_ratio))
    config = {**task.config, "optim": {**task.config.get("optim", {}), "lr": optim.lr}}
    ckpt_path = out / (CHECKPOINT_DCP if sharded else CHECKPOINT)
    return _Run(task, optim, tc, par, model, optimizer, scheduler, n_params, lr_source, config, out, sharded,
                ckpt_path)  # fmt: skip


def _warmup(tc: TrainConfig) -> int:
    return tc.warmup_steps if tc.warmup_steps is not None else max(1, tc.steps // 10)


def _resolved_config(r: _Run, progress_state: _Progress) -> dict[str, Any]:
    """The run's settings plus what was derived from them (written to ``config.json``)."""
    tc, par = r.tc, r.par
    derived = {
        "parameters": r.n_params,
        **r.task.derived,
        "schedule": {"warmup_steps": _warmup(tc), "cosine_steps": progress_state.schedule_steps or tc.steps},
        "lr_source": r.lr_source,
        "threads": torch.get_num_threads(),
        "world_size": par.world,
        "parallel": ("fsdp2" if tc.fsdp else "ddp") if par.enabled else "none",
        "torch": torch.__version__,
    }
    return {**r.config, "derived": derived}


def _train(r: _Run, progress_state: _Progress, resolved: dict[str, Any]) -> dict[str, Any]:
    """The steps from ``progress_state.start``, with metrics, evaluations and checkpoints; then the
    final evaluation, the saved model and the summary."""
    task, tc, par, model, optimizer, scheduler = r.task, r.tc, r.par, r.model, r.optimizer, r.scheduler
    start = progress_state.start
    reporter = Reporter(tc.report_to, r.out, start, resolved) if tc.report_to and par.is_main else None
    metrics = open(r.out / METRICS, "a") if par.is_main else None  # noqa: SIM115 - closed below

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if reporter is not None:
            reporter.log(record)

    initial = progress_state.initial
    if task.eval_at_start and start == 0:
        initial = task.evaluate(model)
        log({"step": 0, "tokens": 0, "elapsed_s": 0.0, **initial})

    stop = min(tc.steps, tc.stop_at) if tc.stop_at is not None else tc.steps
    tally = _Tally(elapsed=progress_state.elapsed, tokens=progress_state.tokens if start > 0 else 0)
    last_eval: tuple[int, dict[str, float]] = (-1, {})
    window = _Window(skipped_from=getattr(optimizer, "skipped_total", 0))
    # A bar on a terminal; in batch jobs (no TTY) one line every log_every steps instead.
    bar = tc.progress and par.is_main and sys.stderr.isatty()
    lines = par.is_main and not bar
    progress = _progress_bar(tc.steps, start, bar, r.optim.optimizer)
    if lines:
        print(f"{r.optim.optimizer}: {r.n_params:,} parameters, steps {start}-{tc.steps}", flush=True)
    optimizer_step = adapm.compile_step(optimizer) if r.optim.compile_step else optimizer.step
    try:
        for step in range(start, stop):
            t0 = time.perf_counter()
            loss, tokens, step_metrics, grad_norm = _forward_backward(r, step)
            optimizer_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.add(loss, tokens, step_metrics)
            if lines and step == start:  # once, when the (lazily made) state exists
                print(f"{r.optim.optimizer}: optimizer state {adapm.state_bytes(optimizer):,} bytes", flush=True)
            done = step + 1
            eval_now = done % tc.eval_every == 0 or done == tc.steps
            save_now = done % tc.checkpoint_every == 0 or done == stop
            if not (eval_now or save_now or done % tc.log_every == 0 or done == tc.steps):
                tally.elapsed += time.perf_counter() - t0  # the device may still be busy: read at the next
                progress.update(1)  # log step, evaluation or checkpoint, which waits for it
                continue
            bad_losses, all_skipped = _read(r, window, tally)
            tally.elapsed += time.perf_counter() - t0
            train_loss = tally.train_loss
            record = _periodic(r, done, window, grad_norm)
            if eval_now:
                t_eval = time.perf_counter()
                last_eval = (done, task.evaluate(model))
                record.update(last_eval[1])
                window.pause(t_eval)
            if record:
                log({"step": done, "train_loss": train_loss, **tally.metrics, "lr": scheduler.get_last_lr()[0],
                     "tokens": tally.tokens, "elapsed_s": tally.elapsed, "state_bytes": adapm.state_bytes(optimizer),
                     "peak_rss_bytes": par.max(peak_rss_bytes()), **record})  # fmt: skip
            _check_health(done, bad_losses, all_skipped, record.get(task.primary), tc, r.ckpt_path)
            if save_now:
                t_ckpt = time.perf_counter()
                _save(r, {"rng": torch.get_rng_state(), "step": done, "elapsed": tally.elapsed, "tokens": tally.tokens,
                          "initial": json.dumps(initial), "config": json.dumps(r.config)})  # fmt: skip
                window.pause(t_ckpt)
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.3f}")
            if lines and "tokens_per_s" in record:
                _log_line(r.optim.optimizer, done, tc.steps, train_loss, scheduler.get_last_lr()[0], record)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        if reporter is not None:
            reporter.close()

    if stop < tc.steps:
        return {"stopped_at": stop}
    final = last_eval[1] if last_eval[0] == tc.steps else task.evaluate(model)
    return _finish(r, resolved, start, final, initial, tally)


def _finish(
    r: _Run, resolved: dict[str, Any], start: int, final: dict[str, float], initial: dict[str, Any], tally: _Tally
) -> dict[str, Any]:
    """Save the model (if asked) and write the summary of a finished run."""
    task, tc, par, optimizer = r.task, r.tc, r.par, r.optimizer
    train_loss, step_metrics, tokens_seen, elapsed = tally.train_loss, tally.metrics, tally.tokens, tally.elapsed
    if tc.save_model:
        full = parallel.full_state_dict(r.model) if r.sharded else None
        if par.is_main:
            parallel.unwrap(r.model).save_pretrained(str(r.out / "model"), state_dict=full)
            if task.save_extra is not None:
                task.save_extra(r.out / "model")
    logged_loss, rates = _metrics_history(r.out / METRICS) if par.is_main else (None, [])
    if start < tc.steps or logged_loss is None:
        logged_loss = train_loss
    summary = {
        "task": task.kind,
        "optimizer": r.optim.optimizer,
        "model": task.model_name,
        "parameters": r.n_params,
        "steps": tc.steps,
        "seed": tc.seed,
        "tokens": tokens_seen,
        "lr": r.optim.lr,
        "lr_source": r.lr_source,
        "final_train_loss": logged_loss,
        **{f"final_{k}": v for k, v in step_metrics.items()},
        "primary": task.primary,
        **{f"final_{k}": v for k, v in final.items()},
        **{f"initial_{k}": v for k, v in initial.items()},
        **{k: v for k, v in task.derived.items() if isinstance(v, (int, float, str))},
        "tokens_per_s": statistics.median(rates) if rates else None,
        "train_seconds": elapsed,
        "state_bytes": adapm.state_bytes(optimizer),
        "peak_rss_bytes": par.max(peak_rss_bytes()),
        "threads": torch.get_num_threads(),
        "world_size": par.world,
        "parallel": resolved["derived"]["parallel"],
    }
    if par.is_main:
        (r.out / SUMMARY).write_text(json.dumps(summary, indent=2))
    par.barrier()
    return summary


def _forward_backward(r: _Run, step: int) -> tuple[torch.Tensor, int, dict[str, float], Any]:
    """One step's gradient: ``grad_accum`` micro-batches, then the clip (or, on a logging step, the
    norm alone). Returns the loss (summed over micro-batches, on the device: not read here), tokens, the
    task's metrics and the gradient norm (or None)."""
    tc = r.tc
    total: torch.Tensor | None = None
    tokens, sums = 0, {}
    for micro in range(tc.grad_accum):
        result = r.task.step(r.model, step, micro)
        loss = result.loss / tc.grad_accum
        loss.backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        tokens += result.tokens
        for k, v in result.metrics.items():
            sums[k] = sums.get(k, 0.0) + v / tc.grad_accum
    grad_norm = None
    if tc.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), tc.grad_clip)
    elif (step + 1) % tc.log_every == 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), math.inf)
    return cast(torch.Tensor, total), tokens, sums, grad_norm


def _read(r: _Run, window: _Window, tally: _Tally) -> tuple[int, int]:
    """Read what the steps since the last read left on the device (the steps' one wait for it): the
    last step's loss and metrics (averaged over ranks) and the tokens (summed) go into ``tally``.
    Returns the steps in a row whose loss was not finite, and in which the optimizer skipped every
    parameter (AdaPM; 0 for the others)."""
    par = r.par
    tally.train_loss = par.mean(cast(torch.Tensor, window.loss))
    tally.metrics = {k: par.mean(v) for k, v in window.metrics.items()}
    tokens = round(par.mean(window.unread_tokens) * par.world)
    tally.tokens += tokens
    window.tokens += tokens
    window.unread_tokens = 0
    return int(par.max(cast(torch.Tensor, window.bad_losses))), getattr(r.optimizer, "skipped_streak", 0)


def _periodic(r: _Run, done: int, window: _Window, grad_norm: Any) -> dict[str, Any]:
    """Every ``log_every`` steps (and at the end): tokens/s over the window, the gradient norm, CUDA
    memory and (AdaPM) the parameters skipped since the last line; an empty record otherwise."""
    record: dict[str, Any] = {}
    if done % r.tc.log_every == 0 or done == r.tc.steps:
        now = time.perf_counter()
        record.update(tokens_per_s=window.tokens / max(now - window.start, 1e-9))
        if grad_norm is not None:
            record.update(grad_norm=float(grad_norm))
        if r.par.device.type == "cuda":
            record.update(max_memory_allocated=torch.cuda.max_memory_allocated(r.par.device))
        skipped_total = getattr(r.optimizer, "skipped_total", None)
        if skipped_total is not None:
            record.update(skipped_params=skipped_total - window.skipped_from)
            window.skipped_from = skipped_total
        window.start, window.tokens = now, 0
    return record


def _save(r: _Run, extra: dict[str, Any]) -> None:
    """A checkpoint of the model, optimizer, schedule and ``extra`` (atomic; DCP when sharded). Ctrl-C
    or SIGTERM while it is written takes effect once it is complete."""
    with signals_deferred():
        if r.sharded:
            extra = {**extra, "scheduler": r.scheduler.state_dict()}
            parallel.dcp_save(r.ckpt_path, r.model, r.optimizer, extra, r.par)
        elif r.par.is_main:
            save_checkpoint(r.ckpt_path, {"model": parallel.unwrap(r.model).state_dict(),
                                          "optimizer": r.optimizer.state_dict(),
                                          "scheduler": r.scheduler.state_dict(), **extra})  # fmt: skip
    r.par.barrier()


def _check_health(
    done: int, bad_loss: int, all_skipped: int, primary: float | None, tc: TrainConfig, ckpt_path: Path
) -> None:
    """Stop a run that cannot recover, before it writes a checkpoint of the damage."""
    why = None
    if bad_loss >= tc.max_bad_steps:
        why = f"the training loss was not finite for {bad_loss} steps in a row"
    elif all_skipped >= tc.max_bad_steps:
        why = f"every parameter had non-finite gradients (and was skipped) for {all_skipped} steps in a row"
    elif primary is not None and not math.isfinite(primary):
        why = f"the validation metric is {primary}"
    if why is not None:
        kept = f"the last checkpoint ({ckpt_path}) is intact" if ckpt_path.exists() else "no checkpoint was written"
        raise TrainingStopped(
            f"training stopped at step {done}: {why}; {kept}. Lower the learning rate, check the data, or "
            "resume from the checkpoint"
        )


def _extra_template(scheduler: Any) -> dict[str, Any]:
    return {
        "rng": torch.get_rng_state(),
        "step": 0,
        "elapsed": 0.0,
        "tokens": 0,
        "initial": "{}",
        "config": "",
        "scheduler": scheduler.state_dict(),
    }


def _log_line(name: str, done: int, steps: int, loss: float, lr: float, record: dict[str, Any]) -> None:
    parts = [f"{name} step {done}/{steps}", f"loss {loss:.4f}", f"lr {lr:.3g}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "grad_norm" in record:
        parts.append(f"grad norm {record['grad_norm']:.3g}")
    for key in ("val_loss", "val_reward"):
        if key in record:
            parts.append(f"{key.replace('_', ' ')} {record[key]:.4f}")
    if record.get("skipped_params"):
        parts.append(f"skipped {record['skipped_params']}")
    print(", ".join(parts), flush=True)


def _progress_bar(total: int, initial: int, enabled: bool, label: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=label, unit="step", dynamic_ncols=True)
