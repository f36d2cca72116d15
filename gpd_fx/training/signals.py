"""Deferred Ctrl-C: the first SIGINT becomes a flag checked between steps, a second one aborts."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from gpd_fx.training.errors import _AbortNow
from gpd_fx.training.progress import _Printer


@contextlib.contextmanager
def _deferred_sigint(printer: _Printer) -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a flag checked between steps; a second one aborts at once.

    A ``KeyboardInterrupt`` raised in the middle of ``optimizer.step()`` would leave some
    parameters updated and others not, so the checkpoint saved afterwards would be of no
    step at all. Deferring the first interrupt to the end of the step avoids that.
    Signal handlers can only be installed from the main thread; elsewhere this is a no-op.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001 - signature fixed by signal
        if flag["stop"]:
            raise _AbortNow()
        flag["stop"] = True
        printer("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
