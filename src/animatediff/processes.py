"""Whether a process still lives: for the lock and temporary files that name their writer.
Torch-free, so that the command line's light half can use it too."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (on Windows, where signal 0 would end it: assumed so)."""
    if pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or not a pid
        return False
    except PermissionError:  # someone else's process
        return True
    return True
