"""Console output of a run: rank-0 messages and tqdm progress bars that do not tear each other."""

from __future__ import annotations

import sys
from typing import Any


class _Printer:
    """Prints on rank 0 only, through tqdm so that lines do not tear progress bars."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()


def _progress_bar(enabled: bool, **kwargs: Any):
    from tqdm import tqdm

    # mininterval keeps non-TTY logs (CI, files) from filling up with bar refreshes
    return tqdm(disable=not enabled, mininterval=1.0, dynamic_ncols=True, file=sys.stderr, **kwargs)
