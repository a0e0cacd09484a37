"""Atomic, checksummed checkpoints: a crash or a full disk while saving never damages the previous
checkpoint, and a checkpoint damaged on disk is refused on load instead of silently training on garbage."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from adapm.train.optimizers import optimizer_safe_globals

CHECKSUM_KEY = "checksum"
"""Key of the SHA-256 of the payload (every tensor's bytes, dtype and shape, and every other value)."""


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM during the block takes effect when the block is done. An exception
    raised inside ``torch.save``'s writer leaves the file half-written and reads as an unrelated error
    ("enforce fail at inline_container.cc"); the previous checkpoint would be intact, but the run would
    not say it was interrupted. A second signal acts at once (should the block ever hang)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}

    def deliver(signum: int) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            deliver(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        if len(received) == 1:
            deliver(received[0])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def payload_checksum(payload: Any) -> str:
    """SHA-256 over a nested payload in a fixed order: tensors by dtype, shape and raw bytes, containers
    recursively, plain objects by their attributes, everything else by ``repr``. The same after a
    ``torch.save``/``torch.load`` round trip."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                if key != CHECKSUM_KEY:
                    digest.update(repr(key).encode())
                    feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):  # e.g. GaLore's projector objects
            digest.update(f"O{type(value).__qualname__}".encode())
            feed(vars(value))
        else:
            digest.update(repr(value).encode())

    feed(payload)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus its checksum with ``torch.save`` to a temporary file beside ``path``,
    fsync it, then rename it over ``path`` (atomic on POSIX). On any error the temporary file is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**payload, CHECKSUM_KEY: payload_checksum(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.tmpPID``) that a process killed while saving left in
    ``directory``; returns them."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp[0-9]*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` and verify its
    checksum (checkpoints written before checksums existed load unverified).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, unreadable or damaged (the message says which and what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(
            f"cannot read checkpoint {path}: the file is empty (0 bytes), so it was never written completely; "
            "delete it to start the run over, or restore it from a backup"
        )
    try:
        try:
            with torch.serialization.safe_globals(optimizer_safe_globals()):
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a GaLore state in a process that has not imported GaLore yet
            if "galore" not in str(exc).lower():
                raise
            with torch.serialization.safe_globals(optimizer_safe_globals(load_galore=True)):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read checkpoint {path}: {reason}; the file is damaged or not a checkpoint: delete it to "
            "start the run over, or restore it from a backup"
        ) from exc
    if not isinstance(payload, dict):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(payload).__name__}, not a checkpoint dict")
    expected = payload.pop(CHECKSUM_KEY, None)
    if expected is not None and payload_checksum(payload) != expected:
        raise ValueError(
            f"checkpoint {path} is damaged: its contents do not match the checksum stored when it was written "
            "(the file changed on disk); restore it from a backup, or delete it to start the run over"
        )
    return payload
