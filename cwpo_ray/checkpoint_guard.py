"""Ray Train's checkpoints on a disk that fills up.

Ray Train (V2, Ray 2.5x-2.60) copies a checkpoint into its final folder file by file, and rewrites its
list of a run's checkpoints (``checkpoint_manager_snapshot.json``) in place. On a full disk the first
leaves a partial checkpoint folder that nothing removes (the space stays taken), the second an empty
list, after which Ray refuses to start the run at all (CheckpointManagerInitializationError): the same
command would never complete, whatever space is freed. Seen on a small tmpfs (tests/test_disk_full.py).
Hence, for local storage:

- a checkpoint is uploaded only when it fits with ``SPARE_BYTES`` to spare (the list's rewrite and
  rank 0's metric lines need that room); else the worker raises ENOSPC naming the run's folder;
- what a failed upload copied is removed;
- before a fit, a list found cut short is dropped with the run's checkpoints: the stage trains from its
  start, and says so (the checkpoints it listed can no longer be told from partial ones).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from cwpo_ray.disk_space import SPARE_BYTES, folder_bytes, free_bytes, human

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's name for a run's checkpoint list


def upload_kwargs() -> dict:
    """``ray.train.report``'s keyword for ``guarded_upload``, where this Ray has it (Train V2)."""
    import inspect

    import ray.train

    takes_it = "checkpoint_upload_fn" in inspect.signature(ray.train.report).parameters
    return {"checkpoint_upload_fn": guarded_upload} if takes_it else {}


def guarded_upload(checkpoint, dir_name: str):
    """Ray Train's own upload (its storage context's ``persist_current_checkpoint``), refused when the
    checkpoint cannot fit and undone when it fails (see the module doc). Runs on the worker."""
    import ray.train
    from pyarrow.fs import LocalFileSystem

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, LocalFileSystem):  # s3:// and the like: as Ray does it
        return storage.persist_current_checkpoint(checkpoint, dir_name)
    dest = Path(storage.build_checkpoint_path_from_name(dir_name))
    require_room(Path(checkpoint.path), dest)
    try:
        return storage.persist_current_checkpoint(checkpoint, dir_name)
    except BaseException:
        remove_copied(Path(checkpoint.path), dest)
        raise


def require_room(source: Path, dest: Path) -> None:
    """Raise ENOSPC, naming ``dest``'s run folder, unless ``source`` fits there with SPARE_BYTES to spare."""
    size, free = folder_bytes(source), free_bytes(dest)
    if free < size + SPARE_BYTES:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a checkpoint of {human(size)} and "
                                    f"{human(SPARE_BYTES)} to spare, {human(free)} free)", str(dest.parent))


def remove_copied(source: Path, dest: Path) -> None:
    """What an upload of ``source`` copied into ``dest``: its files, then the folders left empty (other
    workers' files of the same checkpoint stay: it is never registered, and theirs are theirs to undo)."""
    for f in source.rglob("*"):
        if f.is_file():
            (dest / f.relative_to(source)).unlink(missing_ok=True)
    folders = sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for folder in [*folders, dest]:
        with contextlib.suppress(OSError):
            folder.rmdir()


def drop_torn_checkpoint_list(run_folder: Path) -> bool:
    """Before a fit: remove ``run_folder`` (one Ray Train run's checkpoints) when its checkpoint list does
    not parse, and say so; True if it did. A missing list is Ray's fresh start, left alone."""
    snapshot = run_folder / SNAPSHOT
    try:
        json.loads(snapshot.read_text())
        return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        print(f"{run_folder.name}: Ray Train's list of checkpoints ({snapshot}) was cut short, by a full disk "
              "most likely; the checkpoints it listed cannot be resumed from: training from the start", flush=True)
        shutil.rmtree(run_folder, ignore_errors=True)
        return True
