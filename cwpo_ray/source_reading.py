"""Where `cwpo data` reads a source from: ``KIND:WHERE`` parsed, a local file or folder or a hub
dataset located, and its splits opened as streams of raw rows (nothing normalized here)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


from cwpo_ray.config import ConfigError
from cwpo_ray.sources import NORMALIZERS
from cwpo_ray.tables import TABLE_SUFFIXES, table_files



KINDS = tuple(NORMALIZERS)
# kind -> (train split, test split, config name) when WHERE is a hub id.
HUB_DEFAULTS = {
    "hh-rlhf": ("train", "test", None),
    "tldr": ("train", "validation", "comparisons"),
    "ultrafeedback": ("train_prefs", "test_prefs", None),
    "pairs": ("train", "test", None),
}
# A table with a prompt column and none of these holds prompts alone, not pairs.
RESPONSE_COLUMNS = ("chosen", "rejected", "response_a", "response_b", "summaries")




def parse_source(source: str) -> tuple[str, str]:
    """``"KIND:WHERE"`` -> (kind, where); ValueError with one line on a mistake."""
    kind, sep, where = source.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ValueError(f"source: expected KIND:PATH_OR_HUB_ID with KIND one of {', '.join(KINDS)}, got {source!r}")
    where = where.strip()
    if not where:
        raise ValueError(f"source: nothing after {kind + ':'!r} (give a local file/folder or a hub dataset id)")
    return kind, where


def locate(where: str) -> tuple[str, str]:
    """("local", path) when WHERE exists here, ("hub", id) when it reads as a hub id;
    ValueError when it reads as a local path that does not exist."""
    path = os.path.expanduser(where)
    if os.path.exists(path):
        return "local", path
    looks_local = (where.startswith(("/", ".", "~", "\\")) or where.lower().endswith(TABLE_SUFFIXES)
                   or where.count("/") > 1 or "\\" in where)
    if looks_local:
        raise ValueError(f"source: file not found: {where}")
    return "hub", where


@dataclass
class Split:
    name: str            # "train" or "test"
    rows: Iterable[dict]  # lazily streamed
    origin: Any           # files or hub split, for the manifest
    total: Optional[int]  # row count when cheaply known (Parquet metadata), else None


def _is_test_file(rel: str, kind: str) -> bool:
    rel = rel.lower()
    return "test" in rel or (kind == "tldr" and "valid" in rel)


def _parquet_rows(files: list[Path]) -> Optional[int]:
    if not all(f.name.endswith(".parquet") for f in files):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _iter_files(files: list[Path], batch_size: int) -> Iterator[dict]:
    from cwpo_ray.tables import iter_rows

    for f in files:
        yield from iter_rows(f, batch_size=batch_size)


def prompts_only(f: Path) -> bool:
    """Whether a Parquet file holds prompts alone (a prompt column, no response column): an
    evaluation table such as the built-in benchmark's test_unseen.parquet, not pairs."""
    if not f.name.endswith(".parquet"):
        return False
    import pyarrow.parquet as pq

    names = set(pq.read_schema(f).names)
    return "prompt" in names and not names & set(RESPONSE_COLUMNS)


def local_files(path: str) -> tuple[list[Path], list[Path]]:
    """(the source's table files, the prompts-only files of a folder that are skipped)."""
    root = Path(path)
    try:
        files = table_files(root)
    except FileNotFoundError as e:
        raise ConfigError(f"source: {e}") from None
    if root.is_file():
        return files, []
    skipped = [f for f in files if prompts_only(f)]
    if skipped and len(skipped) == len(files):
        raise ConfigError(f"source: {path} holds prompts only (no responses): nothing to split")
    return [f for f in files if f not in skipped], skipped


def local_splits(kind: str, path: str, batch_size: int) -> list[Split]:
    """A file is all train; in a folder, files whose relative path says test (tldr: or valid) are test
    (prompts-only files skipped)."""
    root = Path(path)
    files, _ = local_files(path)
    if root.is_file():
        groups = {"train": files}
    else:
        groups = {"test": [], "train": []}
        for f in files:
            groups["test" if _is_test_file(f.relative_to(root).as_posix(), kind) else "train"].append(f)
        if not groups["test"]:
            del groups["test"]
    return [Split(name, _iter_files(fs, batch_size), [str(f) for f in fs], _parquet_rows(fs))
            for name, fs in groups.items()]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def hub_splits(kind: str, hub_id: str, cfg) -> list[Split]:
    """Streaming splits of a hub dataset (test first). Needs network and the ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"source: {hub_id!r} is not a local path, and reading a hub dataset needs the "
                          "'datasets' package") from None
    train, test, name = HUB_DEFAULTS[kind]
    name = cfg.hub_config or name
    train = cfg.train_split or train
    explicit_test = bool(cfg.test_split)
    test = None if cfg.test_split.lower() == "none" else (cfg.test_split or test)

    def load(split: str):
        return datasets.load_dataset(hub_id, name, split=split, streaming=True)

    out = []
    if test:
        try:
            out.append(Split("test", load(test), f"{hub_id}:{test}", None))
        except Exception as e:  # noqa: BLE001 -- report any loader failure as one line
            if explicit_test or "split" not in str(e).lower():
                raise ConfigError(f"source: cannot read hub dataset {hub_id!r} split {test!r} "
                                  f"(not a local path either): {_first_line(e)}") from None
            print(f"cwpo data: note: {hub_id} has no split {test!r}; no test table", file=sys.stderr)
    try:
        out.append(Split("train", load(train), f"{hub_id}:{train}", None))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"source: cannot read hub dataset {hub_id!r} split {train!r} "
                          f"(not a local path either): {_first_line(e)}") from None
    return out


def open_source(cfg) -> tuple[str, list[Split]]:
    kind, where = parse_source(cfg.source)
    try:
        place, target = locate(where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    splits = local_splits(kind, target, cfg.batch_size) if place == "local" else hub_splits(kind, target, cfg)
    order = {"test": 0, "train": 1}  # test first: a pair in both splits stays in test
    return kind, sorted(splits, key=lambda s: order[s.name])


def limit_rows(rows: Iterable[dict], n: Optional[int]) -> Iterator[dict]:
    if n is None:
        yield from rows
        return
    for i, row in enumerate(rows):
        if i >= n:
            return
        yield row


def progress_bar(total: Optional[int], enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a missing progress bar must not stop a run
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit=" rows", file=sys.stderr, disable=None if enabled else True,
                desc="cwpo data", mininterval=0.5, dynamic_ncols=True)


