"""One run per output folder: a second `cwpo data`, `annotate`, `train-policy` or `pipeline` into
the OUT of a running one is refused with one line, instead of both writing there (the first one
failed). `train-annotator` needs no lock: it writes a private staging folder and publishes it as OUT
by one rename, so of two runs the later one's whole folder stays, never a mix. `evaluate` takes none:
the pipeline runs it as a Ray task (another process, maybe on another node) inside the OUT its driver
holds, where a lock of its own would refuse it; what it writes is two files, each replaced whole.

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

Nested folders: a pipeline holds its OUT and its stages write (and lock) subfolders of it, so a
run is also refused when a folder above its OUT, or one below it, is held by another process.
Once it holds its own lock, a run probes every `.cwpo.lock` that already exists in a folder above
its OUT (none is created there: not in / or $HOME) and every one below it (the walk skips hidden
folders and `*.parquet` table folders, where no run's OUT goes): a probe is a non-blocking shared
flock on a descriptor of its own, taken and dropped at once; it fails only while another process
holds the file. Locks this process holds are skipped, never opened (the pipeline's own stages;
on NFS closing a second descriptor would drop the process's POSIX lock). Why both directions,
and why the probe comes after the run's own lock: of two runs nested in each other, the one that
locks second finds the other's lock held (whichever of the two it is), so they never both go on
(both may be refused when they start at the same moment; either can then be started again). The
pipeline needs the downward probe although its stages lock their own folders: it clears a
stage's folder (`orchestration/markers.stage`) before the stage takes its lock, so a standalone
run in that folder would lose its files, and it would be found out only when that stage came, maybe
hours in. A refused run drops the lock it took; an acquirer that meets another's probe (a lock
held for microseconds) retries for up to ``PROBE_GRACE_S`` before it refuses. The probes hold
nothing: a killed run leaves no stuck lock, above or below.

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
PROBE_GRACE_S = 0.2  # how long an acquirer waits out a lock held only by a nested run's probe

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
            fd = acquire(path, stage)
            try:
                refuse_if_nested(folder)  # after our own lock: of two nested runs, the later one sees the other
            except BaseException:
                release(path, fd)
                raise
            _held[path] = [fd, 1]
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
            lock_soon(fd)
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


def lock_soon(fd: int) -> None:
    """flock ``fd`` exclusively; BlockingIOError if another holds it still after ``PROBE_GRACE_S`` (a
    nested run's probe holds a shared lock for microseconds: not a holder to be refused by)."""
    deadline = time.monotonic() + PROBE_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def refuse_if_nested(folder: Path) -> None:
    """Raise OutInUse when another process holds a folder above ``folder`` or below it."""
    for above in folder.parents:
        holder = held_by_another(above / LOCK_NAME)
        if holder is not None:
            raise OutInUse(refusal(above, holder, inside=folder))
    for below in locks_below(folder):
        holder = held_by_another(below)
        if holder is not None:
            raise OutInUse(refusal(below.parent, holder, around=folder))


def locks_below(folder: Path) -> Iterator[Path]:
    """The lock files in the folders under ``folder`` (not its own), skipping hidden folders
    (.annotate-work's units, a .venv) and table folders (*.parquet): no run's OUT is there."""
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".parquet")]
        if LOCK_NAME in files and top != str(folder):
            yield Path(top) / LOCK_NAME


def held_by_another(path: Path) -> bytes | None:
    """The holder's note when another process holds the existing lock file ``path``; None when it is
    free, absent or unreadable, or this process's own (skipped, not opened)."""
    if path in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # the usual case: no lock file there
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped by the close below
    except BlockingIOError:
        return os.pread(fd, 4096, 0)
    except OSError:  # ENOLCK: cannot tell (acquire has warned about its own folder)
        return None
    finally:
        os.close(fd)
    return None


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


def refusal(folder: Path, holder: bytes, inside: Path | None = None, around: Path | None = None) -> str:
    """The one line a refused run prints: ``folder`` is held; the run's OUT is ``inside`` it, or
    ``around`` it (a folder above it), or (neither) ``folder`` itself."""
    try:
        h = json.loads(holder)
        who = f"`cwpo {h['stage']}` (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):  # the holder has not written its note yet
        who = "another run"
    if inside is not None:
        return (f"{inside} is inside {folder}, which is in use by {who}: wait for it to end, or give an "
                "output folder outside it")
    if around is not None:
        return (f"{folder}, inside {around}, is in use by {who}: wait for it to end, or give another "
                "output folder")
    return f"{folder} is in use by {who}: wait for it to end, or give another output folder"
