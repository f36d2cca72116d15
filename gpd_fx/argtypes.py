"""``argparse`` value types shared by the project's command lines (``gpd-fx``, the zoo sweep)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["positive_int"]


def positive_int(name: str = "", why: str = "") -> Callable[[str], int]:
    """An ``argparse`` ``type=`` that accepts integers >= 1.

    Args:
        name: what the value is (``"ratio"``), for the message ``"<name> must be an integer >= 1"``;
            empty for ``"expected an integer >= 1"``.
        why: a reason appended to the message for values < 1 (``"the teacher is ratio x wider"``).
    """
    head = f"{name} must be an integer >= 1" if name else "expected an integer >= 1"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{head}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{head}{f' ({why})' if why else ''}, got {value}")
        return value

    return parse
