"""The training loop: run directory contents, exact resume, refusal to overwrite, bf16 and accumulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapm.train.checkpoint import load_checkpoint, save_checkpoint
from adapm.train.loop import WarmupCosine, peak_rss_bytes, pretrain

from conftest import tiny_config


def test_pretrain_writes_the_run_directory(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    summary = pretrain(tiny_config(play_text, cache_dir, tmp_path / "run"))
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "model"} <= {p.name for p in run.iterdir()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert {"step", "train_loss", "lr", "tokens_per_s", "state_bytes", "peak_rss_bytes"} <= set(metrics[0])
    assert [m["step"] for m in metrics if "val_loss" in m] == [4, 8]
    assert summary["final_val_loss"] < summary["unigram_val_loss"] + 1.0
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["optim"]["lr"] == 3e-3 and resolved["derived"]["vocab_size"] == 300
    assert (run / "model" / "config.json").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        pretrain(tiny_config(play_text, cache_dir, run))


@pytest.mark.parametrize("optimizer", ["adapm", "adamw", "galore"])
def test_resume_continues_exactly(play_text: Path, cache_dir: Path, tmp_path: Path, optimizer: str) -> None:
    straight = tmp_path / "straight"
    pretrain(tiny_config(play_text, cache_dir, straight, optimizer, save_model=False))
    broken = tmp_path / "broken"
    assert pretrain(tiny_config(play_text, cache_dir, broken, optimizer, stop_at=4)) == {"stopped_at": 4}
    pretrain(tiny_config(play_text, cache_dir, broken, optimizer, resume=True, save_model=False))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(broken / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(straight) == losses(broken)


def test_bf16_autocast_and_gradient_accumulation(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    summary = pretrain(tiny_config(play_text, cache_dir, tmp_path / "bf16", "adapm-mini", bf16=True, grad_accum=2))
    assert summary["tokens"] == 8 * 2 * 4 * 32
    assert summary["final_val_loss"] < 6.0


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.ones(3)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(3), "bad": Unpicklable()})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_schedule() -> None:
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


# ------------------------------------------------------------ resume, damage and run-directory faults


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = pretrain(tiny_config(play_text, cache_dir, run, save_model=False))
    before = _snapshot(run)
    assert pretrain(tiny_config(play_text, cache_dir, run, resume=True, save_model=False)) == summary
    assert _snapshot(run) == before


def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = pretrain(tiny_config(play_text, cache_dir, run, save_model=False))
    (run / "summary.json").unlink()  # killed between the last checkpoint and the summary
    again = pretrain(tiny_config(play_text, cache_dir, run, resume=True, save_model=False))
    assert again["final_train_loss"] == first["final_train_loss"]
    assert again["final_val_loss"] == first["final_val_loss"]
    assert again["tokens_per_s"] == first["tokens_per_s"] and again["tokens"] == first["tokens"]


def test_a_fresh_start_drops_metric_lines_of_a_run_killed_before_its_first_checkpoint(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "train_loss": 9.0}\n{"step": 4, "train_loss": 8.0}\n')
    (run / ".checkpoint.pt.tmp12345").write_bytes(b"half a checkpoint")
    pretrain(tiny_config(play_text, cache_dir, run, save_model=False))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert not (run / ".checkpoint.pt.tmp12345").exists()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(lr=0.03), ["optim.lr"]),
        (dict(tracker="gd", correction="none"), ["optim.correction", "optim.tracker"]),
    ],
)
def test_resume_refuses_changed_settings(
    play_text: Path, cache_dir: Path, tmp_path: Path, changes: dict, named: list[str]
) -> None:
    import dataclasses

    run = tmp_path / "run"
    assert pretrain(tiny_config(play_text, cache_dir, run, stop_at=4))["stopped_at"] == 4
    cfg = tiny_config(play_text, cache_dir, run, resume=True)
    cfg.optim = dataclasses.replace(cfg.optim, **changes)
    before = _snapshot(run)
    with pytest.raises(ValueError, match="differ") as exc:
        pretrain(cfg)
    assert [k for k in named if k in str(exc.value)] == named
    assert _snapshot(run) == before
    # Settings that do not change the trajectory may change, logging to TensorBoard from here on included.
    pretrain(tiny_config(play_text, cache_dir, run, resume=True, eval_every=2, log_every=1, save_model=False,
                         report_to="tensorboard"))  # fmt: skip
    assert any((run / "tensorboard").iterdir())


def test_extending_a_finished_run_is_explicit_and_keeps_its_schedule(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config(play_text, cache_dir, run, save_model=False))
    with pytest.raises(ValueError, match=r"train\.steps is 8 in the checkpoint but 12 now.*--extend"):
        pretrain(tiny_config(play_text, cache_dir, run, resume=True, steps=12, save_model=False))
    summary = pretrain(tiny_config(play_text, cache_dir, run, resume=True, extend=True, steps=12, save_model=False))
    assert summary["steps"] == 12
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["train"]["steps"] == 12 and resolved["derived"]["schedule"]["cosine_steps"] == 8
    lrs = {m["step"]: m["lr"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert lrs[10] == lrs[12] == pytest.approx(3e-3 * 0.1)


def test_a_damaged_checkpoint_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    marker = torch.full((4096,), 1.2345)
    save_checkpoint(path, {"model": {"w": marker}, "step": 3})
    assert torch.equal(load_checkpoint(path)["model"]["w"], marker)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(marker[:4].numpy().tobytes())
    assert at > 0
    data[at + 100 : at + 4100] = bytes(b ^ 0xFF for b in data[at + 100 : at + 4100])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its contents do not match the checksum"):
        load_checkpoint(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        load_checkpoint(empty)


def test_non_finite_training_stops_and_keeps_the_last_checkpoint(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from adapm.train.loop import TrainingStopped

    run = tmp_path / "run"
    pretrain(tiny_config(play_text, cache_dir, run, stop_at=4))
    payload = load_checkpoint(run / "checkpoint.pt")
    for value in payload["model"].values():
        value.fill_(float("nan"))  # weights that went bad in memory, then were saved
    save_checkpoint(run / "checkpoint.pt", payload)
    before = (run / "checkpoint.pt").read_bytes()
    # checked where the loop reads the device: at the log step (every 2) after the third bad step
    stopped = pytest.raises(TrainingStopped, match=r"stopped at step 8: .*4 steps in a row.*is intact")
    with stopped, pytest.warns(RuntimeWarning, match="skipped"):
        pretrain(tiny_config(play_text, cache_dir, run, resume=True))
    assert (run / "checkpoint.pt").read_bytes() == before
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines[-2:]] == [6, 8]
    assert lines[-1]["skipped_params"] == lines[-2]["skipped_params"] == 2 * 28  # every tensor, two steps
    assert lines[0]["skipped_params"] == 0



def test_the_loop_reads_the_device_only_at_log_steps_evaluations_and_checkpoints(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Every read of a tensor's value (``.item()``, ``float()``: ``aten._local_scalar_dense``, which waits
    for a GPU) made by the harness's own code happens at a step that logs, evaluates or checkpoints:
    the other steps queue their work without waiting. (Reads inside the optimizer and the model are
    theirs: AdaPM's per-block CPU step reads its flags.)"""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    harness = str(Path(pretrain.__code__.co_filename).parent)

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.steps: collections.Counter[object] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten._local_scalar_dense.default:
                frame, origin, step = sys._getframe(1), None, None
                while frame is not None:  # the innermost caller outside torch, and the loop's step
                    name = frame.f_code.co_filename
                    if origin is None and "/torch/" not in Path(name).as_posix() and name != __file__:
                        origin = name
                    if frame.f_code.co_name == "_train" and name.startswith(harness):
                        step = frame.f_locals.get("step")
                    frame = frame.f_back
                if origin is not None and origin.startswith(harness):
                    self.steps[step] += 1
            return func(*args, **(kwargs or {}))

    config = tiny_config(play_text, cache_dir, tmp_path / "run", log_every=4, eval_every=8, checkpoint_every=8)
    with Reads() as reads:
        pretrain(config)
    assert set(reads.steps) - {None} == {3, 7}  # steps 4 and 8 (0-based 3, 7) log; 8 evaluates and saves

def test_batch_jobs_get_one_line_per_log_step_and_grad_norms(
    play_text: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrain(tiny_config(play_text, cache_dir, tmp_path / "run", progress=True, save_model=False))
    out = capsys.readouterr().out  # not a terminal: no bar, a line every log_every (2) steps
    lines = [line for line in out.splitlines() if line.startswith("adapm step")]
    assert [line.split()[2].rstrip(",") for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert "tok/s" in lines[0] and "grad norm" in lines[0] and "val loss" in lines[1]
    (state,) = [line for line in out.splitlines() if line.startswith("adapm: optimizer state")]  # once
    assert int(state.split()[3].replace(",", "")) > 0  # after the first step, when the state exists
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["grad_norm"] > 0 for m in metrics)


def test_tensorboard_event_files_hold_the_metrics(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    pretrain(tiny_config(play_text, cache_dir, run, report_to="tensorboard", save_model=False))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "lr", "grad_norm", "state_bytes"} <= set(events.Tags()["scalars"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (m["step"], pytest.approx(m["train_loss"])) for m in logged
    ]
    assert [e.step for e in events.Scalars("val_loss")] == [4, 8]
    with pytest.raises(ValueError, match="Invalid report_to: 'mlflow'"):
        tiny_config(play_text, cache_dir, run, report_to="mlflow")


def test_galore_checkpoints_load_in_a_fresh_process_and_nothing_warns(tmp_path: Path) -> None:
    import subprocess
    import sys

    from adapm.train.config import OptimConfig
    from adapm.train.models import build_model
    from adapm.train.optimizers import build_optimizer

    model = build_model("gpt2-1m", 300, 32)
    opt = build_optimizer(model, OptimConfig(optimizer="galore"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    save_checkpoint(tmp_path / "g.pt", {"optimizer": opt.state_dict()})
    code = (
        "import sys; from adapm.train.checkpoint import load_checkpoint; "
        f"load_checkpoint({str(tmp_path / 'g.pt')!r}); print('galore_torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
    assert "gemm_4bit" not in proc.stderr
    memory = subprocess.run([sys.executable, "-m", "adapm.cli", "memory", "--model", "gpt2-124m"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert memory.returncode == 0 and "galore" in memory.stdout and "gemm_4bit" not in memory.stderr


def test_compile_step_trains_as_the_eager_step(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    """``--compile-step``: the loop steps with adapm.compile_step (one compiled graph): the same losses and
    weights as the eager step to float32 rounding; refused for an optimizer that is not AdaPM's."""
    from adapm.train.compare import run_config
    from adapm.train.config import CompareConfig, OptimConfig

    runs = {}
    for compiled in (False, True):
        cfg = tiny_config(play_text, cache_dir, tmp_path / str(compiled), "adapm-mini", steps=6, eval_every=6,
                          checkpoint_every=6, save_model=False)  # fmt: skip
        cfg.optim.compile_step = compiled
        pretrain(cfg)
        run = tmp_path / str(compiled)
        runs[compiled] = ([json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()],
                          load_checkpoint(run / "checkpoint.pt")["model"])  # fmt: skip
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, value in runs[False][1].items():
        assert torch.allclose(value, runs[True][1][key], rtol=1e-4, atol=1e-6), key
    for name, extra in (("adamw", {}), ("adapm-int8", {}), ("adapm", {"state_dtype": "bf16"})):
        with pytest.raises(ValueError, match=r"compile_step.*AdaPM optimizers with fp32 state only"):
            OptimConfig(optimizer=name, compile_step=True, **extra)
    compare = CompareConfig(optimizers="adamw,adapm-mini,adapm-mini-int8", optim=OptimConfig(compile_step=True))
    assert [run_config(compare, name).optim.compile_step for name in compare.optimizer_list()] == [False, True, False]


def test_peak_rss_is_the_process_own_not_its_parent() -> None:
    """A run started by a bigger process (as `adapm compare` starts each optimizer's run) reports its
    own peak: getrusage's ru_maxrss would report the parent's, which Linux carries across exec."""
    ballast = torch.ones(2**30, dtype=torch.uint8)  # 1 GiB, every page touched
    assert peak_rss_bytes() >= ballast.numel()
    code = "from adapm.train.loop import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    assert 0 < int(child.stdout) < 2**30


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path: Path) -> None:
    """SIGINT in the middle of a save takes effect once the file is complete (raised inside torch's
    writer it read as "enforce fail at inline_container.cc" and left a temporary file); a second
    SIGINT acts at once."""
    import os
    import signal

    from adapm.train.checkpoint import signals_deferred

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a test runner may differ)
    try:
        path = tmp_path / "checkpoint.pt"
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            save_checkpoint(path, {"w": torch.arange(10.0)})
        assert torch.equal(load_checkpoint(path)["w"], torch.arange(10.0))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        reached = False
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached = True
        assert not reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
