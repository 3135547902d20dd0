"""The pipeline's resumable stages: a stage's folder holds a marker with the fingerprint of what
it was made from; a stage whose marker matches is reused, anything else is made again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from cwpo_ray.fingerprints import code_version, path_fingerprint


def source_fingerprint(source: str) -> str:
    """Local files by path, size and mtime (cheap at any size); a hub id by its name."""
    return path_fingerprint(source.partition(":")[2], source)


def stage(folder: Path, fp: str, work: Callable[[], dict], label: str = "") -> dict:
    """Run ``work`` into ``folder`` unless its marker says it is done with this fingerprint.

    The marker holds the fingerprint from the start and the result only at the end, each written
    atomically. A stage killed midway is run again: with the same fingerprint into its folder as it
    was (train-policy resumes from its checkpoints there), with another one (or no marker) into a
    cleared folder, so nothing of an old config leaks in. Returns what ``work`` returned (kept in
    the marker, so a skipped stage returns it too).
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
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(marker, {"fingerprint": fp, "code_version": code_version()})  # started, not done
    with console.timed_stage(label or folder.name) as done:
        result = work()
        done(result)
    write_marker(marker, {"fingerprint": fp, "code_version": code_version(), "result": result})
    return result


def write_marker(marker: Path, content: dict) -> None:
    from cwpo_ray.tables import atomic_path

    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(content, indent=2, default=str))


