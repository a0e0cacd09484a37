"""Supervised fine-tuning data: the user's JSONL or a built-in dataset of real text, tokenized with the
loss on response tokens only.

The built-in dataset needs nothing but Python: its questions name functions and classes of the
standard library ("What does `json.dumps` do in Python?") and its answers are the first paragraph of
their own docstrings, as installed with the interpreter. No sentence is invented here.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapm.train.data import read_records

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (the prompt), as Hugging Face models expect."""

STDLIB_MODULES = (
    "json", "os.path", "re", "itertools", "functools", "collections", "math", "statistics", "pathlib",
    "textwrap", "string", "datetime", "shutil", "random", "heapq", "bisect", "fnmatch", "glob", "zipfile",
    "csv", "base64", "hashlib", "difflib", "operator", "copy", "tempfile", "urllib.parse", "html", "uuid",
)  # fmt: skip
"""Modules whose documented public functions and classes make the built-in dataset."""


def _first_paragraph(doc: str) -> str:
    paragraphs = [p.strip() for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    if not paragraphs:
        return ""
    first = paragraphs[0]
    if first.endswith(")") and "(" in first.splitlines()[0] and len(paragraphs) > 1:
        first = paragraphs[1]  # skip a signature line such as "dumps(obj, ...)"
    return " ".join(first.split())


def builtin_examples(modules: Iterable[str] = STDLIB_MODULES, min_words: int = 6) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` pairs from standard-library docstrings (deterministic order)."""
    examples = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            home = getattr(obj, "__module__", None) or module_name
            if home.lstrip("_").split(".")[0] != module_name.split(".")[0] and sys.modules.get(home) is not module:
                continue  # re-exported from elsewhere
            answer = _first_paragraph(obj.__doc__ or "")
            if len(answer.split()) < min_words:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            examples.append(
                {"prompt": f"What does the {kind} `{module_name}.{name}` do in Python?", "response": answer}
            )
    return examples


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSONL file (or a ``.json`` array): each ``{"prompt", "response"}`` or ``{"messages": [...]}``
    (chat format with ``role``/``content``; the last message must be the assistant's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    records = []
    for where, record in read_records(path):
        if (
            isinstance(record, dict)
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("response"), str)
        ) or (isinstance(record, dict) and _valid_messages(record.get("messages"))):
            records.append(record)
        else:
            raise ValueError(
                f"{where}: expected {{'prompt': str, 'response': str}} or "
                "{'messages': [{'role', 'content'}, ...]} ending with an assistant message"
            )
    if not records:
        raise ValueError(f"--data: {path} contains no records")
    return records


def _valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        and messages[-1]["role"] == "assistant"
    )


def as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record in chat form."""
    if "messages" in record:
        return list(record["messages"])
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def tokenize(tokenizer: Any, record: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (prompt positions set to :data:`IGNORE_INDEX`), truncated to
    ``max_length``. Uses the tokenizer's chat template when it has one, else a plain
    "Question:/Answer:" layout; the response ends with the eos token."""
    messages = as_messages(record)
    prompt_messages, answer = messages[:-1], messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "keys"):  # transformers 5 returns a BatchEncoding
            prompt_ids = prompt_ids["input_ids"]
    else:
        text = "".join(f"{'Question' if m['role'] == 'user' else m['role'].title()}: {m['content']}\n"
                       for m in prompt_messages)  # fmt: skip
        prompt_ids = tokenizer(text + "Answer: ", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    ids = (list(prompt_ids) + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}
