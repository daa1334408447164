"""One process a file: an exclusive ``flock`` on ``<path>.lock``, which the kernel drops when the process dies
(so a ``kill -9`` never leaves a stale lock). A lock file of its own, so it never meets sqlite's POSIX locks."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def take_lock(path: Path) -> int:
    """Lock ``<path>.lock`` (created 0600); returns its descriptor, closed to release. ``LockHeld`` when another
    process has it, ``OSError`` when the lock file cannot be opened."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LockHeld(str(lock_path(path))) from None
    return fd
