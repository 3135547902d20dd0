"""The pipeline's resumable stages: a stage's folder holds a marker with the fingerprint of what
it was made from; a stage whose marker matches is reused, anything else is made again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from cwpo_ray.disk_space import no_space_error, require_space
from cwpo_ray.fingerprints import code_version, path_fingerprint


def source_fingerprint(source: str) -> str:
    """Local files by path, size and mtime (cheap at any size); a hub id by its name."""
    return path_fingerprint(source.partition(":")[2], source)


def stage(folder: Path, fp: str, work: Callable[[], dict], label: str = "",
          need: Callable[[], int] | None = None) -> dict:
    """Run ``work`` into ``folder`` unless its marker says it is done with this fingerprint.

    The marker holds the fingerprint from the start and the result only at the end, each written
    atomically. A stage killed midway is run again: with the same fingerprint into its folder as it
    was (train-policy resumes from its checkpoints there), with another one (or no marker) into a
    cleared folder, so nothing of an old config leaks in. Returns what ``work`` returned (kept in
    the marker, so a skipped stage returns it too).

    ``need``: the bytes the stage is estimated to write into ``folder`` (cwpo_ray/disk_space.py). A stage
    whose disk has not that much free is refused before it starts, one that fills its disk anyway is
    stopped: either way with disk_space.NotEnoughSpace, one line naming the folder, the need, the free space.
    """
    from cwpo_ray import console

    marker = folder / ".stage.json"
    saved = json.loads(marker.read_text()) if marker.exists() else {}
    if saved.get("fingerprint") == fp and "result" in saved:
        console.stage_line(label or folder.name, "done already, reusing", fingerprint=fp)
        return saved["result"]
    if saved.get("fingerprint") not in (None, fp):
        # Say why a stage an earlier run did is not reused: the code, or its settings and inputs.
        why = "the code" if saved.get("code_version", code_version()) != code_version() else "its settings or inputs"
        console.say(f"  {label or folder.name}: {why} changed since the last run "
                    f"(fingerprint {saved['fingerprint']} -> {fp}): running it again")
    if saved.get("fingerprint") != fp and folder.exists():
        shutil.rmtree(folder)
    needed = need() if need is not None else 0
    if needed:  # measured after the clearing above, which frees what an old run left
        require_space(folder, needed, label or folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(marker, {"fingerprint": fp, "code_version": code_version()})  # started, not done
    with console.timed_stage(label or folder.name) as done:
        result = run_work(work, folder, needed)
        done(result)
    write_marker(marker, {"fingerprint": fp, "code_version": code_version(), "result": result})
    return result


def run_work(work: Callable[[], dict], folder: Path, need: int) -> dict:
    """``work()``; a full disk met in it (however Ray wrapped it) raised as the one-line NotEnoughSpace."""
    try:
        return work()
    except Exception as e:
        full = no_space_error(e, folder, need)
        if full is None:
            raise
        raise full from e


def write_marker(marker: Path, content: dict) -> None:
    from cwpo_ray.tables import atomic_path

    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(content, indent=2, default=str))


