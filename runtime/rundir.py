"""The run directory's lock: one training run writes a directory at a time. ``hold(out_dir)``
takes an exclusive flock on ``out_dir/.shardgrad.lock`` (which names the holder's host and
pid); the kernel drops it when its process dies, so a killed run's lock is taken over.
Imports runtime.config (ConfigError).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from shardgrad.runtime.config import ConfigError

LOCK = ".shardgrad.lock"


def _unwritable(out_dir: str, e: OSError, path: str | None = None) -> ConfigError:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):   # not "File exists (lock)"
        return ConfigError(f"the run directory {out_dir!r} (--out) is a file, not a directory")
    where = f" ({path})" if path else ""
    return ConfigError(f"cannot write the run directory {out_dir!r} (--out): "
                       f"{e.strerror or e}{where}")


def holder(out_dir: str) -> dict | None:
    """What the lock file in ``out_dir`` says of its holder (host, pid, since), or None."""
    try:
        with open(os.path.join(out_dir, LOCK)) as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _acquire(out_dir: str) -> int:
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            info = holder(out_dir) or {}
            since = info.get("since")
            when = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                    if isinstance(since, int | float) else "")
            raise ConfigError(
                f"the run directory {out_dir!r} (--out) is in use by another run: pid "
                f"{info.get('pid', '?')} on host {info.get('host', '?')}{when} holds {path}; "
                f"give this run another --out, or stop that one") from None
        # A releasing holder unlinks the file: if ours is no longer the one at ``path``, the
        # lock we got guards nothing, so try again on the new file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold(out_dir: str | None) -> Iterator[None]:
    """Create ``out_dir`` and hold its lock for the ``with`` block (nothing when None).
    ConfigError (one line) when another live process holds it, naming its host and pid, or
    when the directory cannot be written, naming the path."""
    if out_dir is None:
        yield
        return
    path = os.path.join(out_dir, LOCK)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = _acquire(out_dir)
    except OSError as e:
        raise _unwritable(out_dir, e, path) from None
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": round(time.time(), 3)}).encode(), 0)
        except OSError as e:
            raise _unwritable(out_dir, e, path) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)     # before unlocking, so a waiter re-checks (see _acquire)
        os.close(fd)


__all__ = ["LOCK", "hold", "holder"]
