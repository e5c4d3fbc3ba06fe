"""SIGTERM and SIGINT for ``streamproc run``, from the process's first moment to its last.

:func:`catch` installs a handler that only remembers the signal. ``streamproc run`` calls it
before it imports anything slow (the model stack alone takes seconds), so a signal during
start-up never kills the process with an empty log. The service then takes the signals over
on its event loop and asks :func:`caught` whether one came first; when it hands them back,
it calls :func:`catch` again, so a signal during the last steps of the exit is not fatal
either.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["STOP_SIGNALS", "catch", "caught"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_caught: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _caught.append(signum)


def catch() -> None:
    """Remember SIGTERM and SIGINT from now on, rather than die of them (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def caught() -> bool:
    """Whether a signal came while only :func:`catch`'s handler was in place."""
    return bool(_caught)
