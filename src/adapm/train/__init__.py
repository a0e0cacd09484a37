"""The adapm harness: pretraining, side-by-side comparisons and memory accounting.

One module per concern: :mod:`config` (typed dataclass configs), :mod:`data` (corpus, tokenizer,
token cache, batches), :mod:`models` (size presets), :mod:`optimizers` (every optimizer by name),
:mod:`checkpoint` (atomic save/load), :mod:`loop` (the training loop), :mod:`compare` (one fresh
process per optimizer), :mod:`memory` (state bytes at paper scale on the meta device).
"""
