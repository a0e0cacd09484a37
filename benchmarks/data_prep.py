"""Time and peak memory of preparing a pretraining corpus (`adapm pretrain --data`'s first run: train
the BPE tokenizer, tokenize, write the token cache), one fresh subprocess per case.

    python benchmarks/data_prep.py --json runs/bench/data_prep.json
    python benchmarks/data_prep.py --quick          # 2 MB, within a minute

The corpora are made from the embedded Shakespeare plays, repeated to the size asked, in two shapes:
``documents`` (a JSONL file of 5,000-character documents) and ``one-file`` (a single plain-text file,
one long document). ``streamed`` is how the harness prepares data: documents in batches, long
documents in pieces of about a million characters. ``whole`` tokenizes and trains on every document
at once, as one call (the pieces and batches turned off), for comparison; it is run only up to
``--whole-max-mb``, since it needs many times the corpus size in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

SHAPES = ("documents", "one-file")
MODES = ("streamed", "whole")


def make_corpus(shape: str, size_mb: float, out_dir: Path) -> Path:
    """A corpus of ``size_mb`` MB (10^6 characters) of the embedded plays in ``shape``."""
    from adapm.train.data import embedded_corpus_files

    text = "".join(f.read_text() for f in embedded_corpus_files())
    size = int(size_mb * 1e6)
    if shape == "one-file":
        path = out_dir / "corpus.txt"
        with open(path, "w") as f:
            for start in range(0, size, len(text)):
                f.write(text[: min(len(text), size - start)])
        return path
    path = out_dir / "corpus.jsonl"
    with open(path, "w") as f:
        for start in range(0, size, 5000):
            offset = start % len(text)
            f.write(json.dumps({"text": text[offset : offset + min(5000, size - start)]}) + "\n")
    return path


def worker(data: str, cache: str, mode: str) -> dict[str, float]:
    """Runs in the subprocess: prepare the data into a fresh cache; report tokens, seconds, peak RSS."""
    from adapm.train import data as data_module
    from adapm.train.config import DataConfig
    from adapm.train.loop import peak_rss_bytes

    if mode == "whole":
        data_module.PIECE_CHARS = data_module._BATCH_CHARS = sys.maxsize
    start = time.perf_counter()
    prepared = data_module.prepare_data(DataConfig(data=data, cache_dir=cache))
    seconds, peak = time.perf_counter() - start, peak_rss_bytes()
    digest = hashlib.sha256(prepared.train.tobytes() + prepared.val.tobytes()).hexdigest()[:16]
    return {"tokens": len(prepared.train) + len(prepared.val), "tokens_sha256": digest, "seconds": seconds,
            "peak_rss_bytes": peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="50,150", help="corpus sizes in MB (10^6 characters), comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--whole-max-mb", type=float, default=50.0, help="run 'whole' only up to this size")
    parser.add_argument("--quick", action="store_true", help="one 2 MB corpus of each shape")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.quick:
        args.sizes_mb = "2"
    try:
        sizes = [float(s) for s in args.sizes_mb.split(",")]
    except ValueError:
        parser.error(f"--sizes-mb must be numbers separated by commas, got {args.sizes_mb!r}")
    if not sizes or min(sizes) <= 0:
        parser.error(f"--sizes-mb must be positive, got {args.sizes_mb!r}")
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapm-data-prep-") as tmp:
        for size in sizes:
            for shape in shapes:
                corpus_dir = Path(tmp) / f"{shape}-{size:g}"
                corpus_dir.mkdir()
                data = make_corpus(shape, size, corpus_dir)
                for mode in MODES:
                    if mode == "whole" and size > args.whole_max_mb:
                        continue
                    cache = corpus_dir / f"cache-{mode}"
                    proc = subprocess.run([sys.executable, __file__, "--worker", str(data), str(cache), mode],
                                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
                    if proc.returncode != 0:
                        sys.exit(f"data_prep worker ({shape}, {size:g} MB, {mode}) failed:\n{proc.stderr[-3000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append({"shape": shape, "size_mb": size, "mode": mode, **result,
                                 "peak_rss_mb": result["peak_rss_bytes"] / 1e6})  # fmt: skip
                    print(f"{shape} {size:g} MB {mode}: {result['tokens']:,} tokens, {result['seconds']:.1f} s, "
                          f"peak {result['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)  # fmt: skip
    for row in rows:  # the same tokens either way: the pieces are cut where the tokenizer splits anyway
        twin = next((r for r in rows if r is not row and r["shape"] == row["shape"] and r["size_mb"] == row["size_mb"]),
                    None)  # fmt: skip
        row["same_tokens_as_whole"] = None if twin is None else twin["tokens_sha256"] == row["tokens_sha256"]
    columns = [
        ("shape", "{}"),
        ("size_mb", "{:g}"),
        ("mode", "{}"),
        ("tokens", "{:,}"),
        ("seconds", "{:.1f}"),
        ("peak_rss_mb", "{:,.0f}"),
        ("same_tokens_as_whole", "{}"),
    ]
    print(markdown_table(rows, columns))
    info = machine_info()
    info.update(threads="tokenizers' default (all cores)", command=" ".join(sys.argv))
    print(f"\n{info['processor']}, git {info['git_sha']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
