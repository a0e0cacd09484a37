"""The README's statements about the API, checked against the code."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import adapm

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_signature_in_the_readme_is_the_optimizers() -> None:
    """Every keyword argument of ``adapm.AdaPM``, in order and with its default, as the README's
    "The signature" section writes it."""
    text = README.read_text()
    section = text[text.index("### The signature") :]
    call = re.search(r"adapm\.AdaPM\((.*?)\)\n", section, re.S)
    assert call is not None
    written = [part.strip() for part in re.split(r",\s*(?![^()]*\))", call.group(1)) if part.strip()]
    assert written[:3] == ["model_or_params", "lr", "*"], written[:3]
    documented = {}
    for part in written[3:]:
        name, default = part.split("=", 1)
        documented[name] = ast.literal_eval(default)
    parameters = inspect.signature(adapm.AdaPM.__init__).parameters.values()
    actual = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    actual["second_moment"] = adapm.AdaPM._default_second_moment  # None there: the class's default
    assert list(documented) == list(actual)
    assert documented == actual
    config = [f.name for f in dataclasses.fields(adapm.AdaPMConfig)]
    assert config == [name for name in actual if name not in ("rules", "strict")]  # as the README says
