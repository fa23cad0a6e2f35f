"""The device hold: while a named file exists, no new device work starts.

Operators use it to pause compute without dropping the queue (a drill, a noisy neighbour);
tests use it to make "the device is busy" and "this request is still queued" facts they
control, instead of guesses about how long a computation takes on a given machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["wait_while_held"]

_POLL_S = 0.02


def wait_while_held(
    hold_file: Path | None, should_stop: Callable[[], bool] = lambda: False
) -> bool:
    """Block while ``hold_file`` exists (and ``should_stop()`` is false); True if it waited."""
    if hold_file is None:
        return False
    waited = False
    while hold_file.exists() and not should_stop():
        waited = True
        time.sleep(_POLL_S)
    return waited
