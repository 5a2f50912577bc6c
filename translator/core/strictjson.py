"""Strict JSON parsing, shared by the frame parser and the JSON content-format codecs.

The protocol never carries NaN or Infinity (they are not JSON), so the literals `NaN`,
`Infinity` and `-Infinity` are refused, and so is a number such as `1e400`, which is valid
JSON syntax but would become Infinity in Python.
"""

from __future__ import annotations

import json
import math
from typing import Any


class NotJSON(ValueError):
    """Text that Python's json module would accept but JSON does not allow."""


def _reject_constant(name: str) -> Any:
    raise NotJSON(f"{name} is not allowed")


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotJSON(f"number {text[:24]} is out of range")
    return number


def loads(text: str) -> Any:
    """`json.loads` without NaN/Infinity; raises ValueError (NotJSON for those) or
    RecursionError for nesting deeper than the interpreter allows."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
