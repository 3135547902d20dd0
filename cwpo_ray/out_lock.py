"""One run per output folder: a second `cwpo annotate`, `train-policy` or `pipeline` into the OUT
of a running one is refused with one line, instead of both writing there (the first one failed).

The lock is flock(2) on OUT/.cwpo.lock, taken by the driver for the stage's life. The kernel
drops it when the holder's descriptor closes, at exit or by SIGKILL, so a killed run leaves no
stuck lock: its file stays, and the next run takes it. The file holds the holder's pid, host and
stage, for the refusal message only; a run that ends removes it.

Only the driver locks: Ray workers (Train workers, Data actors) never enter a recipe's ``run``.
The descriptor is not inherited by processes the driver starts (Python opens it close-on-exec);
a child *forked* by the driver holds the lock until it exits.

Within one process the lock is reentrant (a count per path): `cwpo pipeline` runs its stages in
its own driver process, and flock locks belong to the open file description, so a second open
and flock of the same file there would refuse itself.

NFS: Linux NFS clients emulate flock with POSIX byte-range locks held by the server (NFSv4, or
NFSv3 with lockd), so the lock holds across nodes. POSIX locks belong to the process and are
all dropped when any descriptor of the file closes: hence one descriptor per path and process.
On a mount with `nolock` or `local_lock=flock` the lock is local to each node: two drivers on
different nodes are then not stopped. Where the file system refuses locks (ENOLCK), the run goes
on unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from cwpo_ray.config import ConfigError

LOCK_NAME = ".cwpo.lock"

_held: dict[Path, list[int]] = {}  # lock file -> [descriptor, depth], this process's locks
_guard = threading.Lock()


class OutInUse(ConfigError):
    """OUT is held by another live run (a ConfigError: the CLI prints its one line and exits 2)."""


@contextlib.contextmanager
def hold_out(out: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold OUT (created if missing) for ``stage`` while the block runs; raise OutInUse, naming
    the folder and its holder, when another process holds it."""
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with _guard:
        if path in _held:
            _held[path][1] += 1
        else:
            _held[path] = [acquire(path, stage), 1]
    try:
        yield
    finally:
        with _guard:
            _held[path][1] -= 1
            if _held[path][1] == 0:
                release(path, _held.pop(path)[0])


def acquire(path: Path, stage: str) -> int:
    """The descriptor of ``path``, flocked; raises OutInUse if another open file description holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise OutInUse(refusal(path.parent, holder)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            print(f"cwpo {stage}: warning: {path.parent} cannot be locked here ({e.strerror}): "
                  "nothing stops a second run into it", file=sys.stderr, flush=True)
        if same_file(fd, path):
            break
        # The holder ended and removed the file between our open and flock: ours is an orphan.
        os.close(fd)
    note = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(note).encode(), 0)
    return fd


def same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def release(path: Path, fd: int) -> None:
    """Remove the file while still holding it (so no one can lock a name about to vanish), then unlock."""
    try:
        if same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


def refusal(folder: Path, holder: bytes) -> str:
    """The one line a refused run prints."""
    try:
        h = json.loads(holder)
        who = f"`cwpo {h['stage']}` (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):  # the holder has not written its note yet
        who = "another run"
    return f"{folder} is in use by {who}: wait for it to end, or give another output folder"
