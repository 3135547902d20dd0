"""Work units of `cwpo annotate` and how a run resumes: the input cut into units of about
`unit_rows` rows (Parquet row-group ranges, JSONL byte ranges), read back one batch at a time;
the run's fingerprint and work folder, and the units already committed there."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pyarrow.parquet as pq

from cwpo_ray.config import ConfigError
from cwpo_ray.tables import atomic_path, table_files
from cwpo_ray.annotation.rows import parse_line

WORK = ".annotate-work"  # inside OUT: committed units and the fingerprint they belong to
FINAL_NAMES = ("annotated.parquet", "quarantine.parquet", "uncertain.parquet", "report.json")  # what OUT gets


def input_files(path: str) -> list[Path]:
    files = table_files(path)
    parquet = [f for f in files if f.name.endswith(".parquet")]
    if parquet and len(parquet) != len(files):
        raise ConfigError(f"data: {path} mixes Parquet and JSONL shards; convert them to one format")
    return files


def parquet_ranges(row_group_rows: list[int], unit_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of a Parquet file: whole row groups merged up to ``unit_rows``,
    a row group larger than that cut into near-equal pieces (each piece decodes its group again)."""
    ranges, start, cur = [], 0, 0
    pos = 0
    for n in row_group_rows:
        if n > unit_rows:
            if cur:
                ranges.append((start, pos))
            pieces = -(-n // unit_rows)
            cuts = [pos + (n * k) // pieces for k in range(pieces + 1)]
            ranges += list(zip(cuts[:-1], cuts[1:]))
            start, cur = pos + n, 0
        elif cur + n > unit_rows:
            ranges.append((start, pos))
            start, cur = pos, n
        else:
            cur += n
        pos += n
    if cur:
        ranges.append((start, pos))
    return [r for r in ranges if r[1] > r[0]]


def byte_ranges(size: int, sample: bytes, unit_rows: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of a JSONL file of ``size`` bytes, sized for about ``unit_rows``
    lines from the mean line length of ``sample`` (its first bytes); a line belongs to the range
    its first byte is in."""
    if size <= 0:
        return []
    line_bytes = len(sample) / max(1, sample.count(b"\n")) if sample else 1.0
    step = max(1, int(unit_rows * line_bytes))
    return [(s, min(s + step, size)) for s in range(0, size, step)]


# A small input is still cut into at least MIN_UNITS units (of at least MIN_UNIT_ROWS rows), so that
# every actor of a pool gets work: a 10k-pair file under the default unit_rows was one unit, which
# one actor labeled while the others idled. 16 divides evenly over 1, 2, 4, 8 and 16 actors.
MIN_UNITS, MIN_UNIT_ROWS = 16, 256


def balanced_unit_rows(total_rows: int, unit_rows: int, min_units: int = MIN_UNITS,
                       min_unit_rows: int = MIN_UNIT_ROWS) -> int:
    """Rows per unit: ``unit_rows``, lowered for a small input to about total / min_units
    (never below ``min_unit_rows``, never above ``unit_rows``). Depends on the input only, not on
    the actor count, so a rerun with other resources plans the same units and resumes."""
    return max(1, min(unit_rows, max(min_unit_rows, -(-total_rows // min_units))))


def plan_units(files: list[Path], unit_rows: int) -> list[dict]:
    """The deterministic work units of the input files (same files and unit_rows, same units)."""
    # first pass: rows per file (Parquet metadata; JSONL estimated from its first MiB)
    layout, total = [], 0
    for f in files:
        if f.name.endswith(".parquet"):
            meta = pq.ParquetFile(f).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            layout.append(("parquet", groups))
            total += sum(groups)
        elif f.name.endswith(".gz"):
            lines = gzip_line_count(f)
            layout.append(("jsonl.gz", lines))
            total += lines
        else:
            with open(f, "rb") as fh:
                sample = fh.read(2**20)
            size = f.stat().st_size
            layout.append(("jsonl", (size, sample)))
            total += int(size / (len(sample) / max(1, sample.count(b"\n")))) if sample else 0
    rows = balanced_unit_rows(total, unit_rows)
    units = []
    for k, (f, (kind, info)) in enumerate(zip(files, layout)):
        if kind == "parquet":
            spans = parquet_ranges(info, rows)
        elif kind == "jsonl.gz":
            spans = [(start, min(start + rows, info)) for start in range(0, info, rows)] or [(0, 0)]
        else:
            spans = byte_ranges(info[0], info[1], rows)
        for start, end in spans:
            units.append({"key": f"f{k:05d}-{max(start, 0):014d}", "path": str(f), "kind": kind,
                          "start": start, "end": end})
    return units


def iter_unit_rows(unit: dict, batch_size: int) -> Iterator[list]:
    """The rows of a unit in batches: dicts for Parquet, parsed lines (or InvalidJSON) for JSONL."""
    if unit["kind"] == "parquet":
        pf = pq.ParquetFile(unit["path"])
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        groups = [g for g, n in enumerate(sizes) if starts[g] < unit["end"] and starts[g] + n > unit["start"]]
        if not groups:
            return
        # row positions relative to the first row group read
        start, end, pos = unit["start"] - starts[groups[0]], unit["end"] - starts[groups[0]], 0
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
            lo, hi = max(start - pos, 0), min(end - pos, batch.num_rows)
            pos += batch.num_rows
            if hi > lo:
                yield batch.slice(lo, hi - lo).to_pylist()
            if pos >= end:
                return
        return
    lines = []
    for line in _unit_lines(unit):
        if line.strip():  # blank lines are not rows (as `cwpo data` reads JSONL)
            lines.append(parse_line(line))
            if len(lines) >= batch_size:
                yield lines
                lines = []
    if lines:
        yield lines


def gzip_line_count(path: Path) -> int:
    """Lines of a gzipped JSONL file (a last line without a newline counts), by one streaming pass."""
    count, last = 0, b"\n"
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(2**20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _unit_lines(unit: dict) -> Iterator[str]:
    if unit["kind"] == "jsonl.gz":
        # gzip cannot seek: a unit is a range of line numbers [start, end), read by decompressing from
        # the start and skipping the lines before it. Decompressing is ~100x cheaper per row than
        # scoring, so even the last unit's skip costs little beside its labeling, and a .gz input still
        # spreads over every actor and resumes unit by unit.
        with gzip.open(unit["path"], "rb") as fh:
            for i, raw in enumerate(fh):
                if i >= unit["end"]:
                    break
                if i >= unit["start"]:
                    yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
        return
    start, end = unit["start"], unit["end"]
    with open(unit["path"], "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line under way belongs to the previous range
        while fh.tell() < end:
            raw = fh.readline()
            if not raw:
                break
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def fingerprint(cfg, files: list[Path]) -> dict:
    """What the committed units depend on (``cfg``: annotate's Config, its precision already resolved
    to what the actors run): input files, annotator files, output-changing settings.

    Batch sizes, actor counts, the device and the output file limits are left out: they change
    how the work is done (batch sizes and device the last float digits), not which rows a unit holds."""
    precision = cfg.precision
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"fingerprint: resolve precision {precision!r} first (annotate.actor_precision)")
    annotator = Path(cfg.annotator).resolve()
    ann = sorted((str(p.relative_to(annotator)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in annotator.rglob("*") if p.is_file())
    return {"input": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "annotator": [str(annotator)] + [list(a) for a in ann],
            # precision only when not fp32: a work folder of a run before the setting existed (fp32) still resumes
            "settings": {"unit_rows": cfg.unit_rows, "export_uncertain": cfg.export_uncertain,
                         **({"precision": precision} if precision != "fp32" else {})}}


def digest(part: Any) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=list).encode()).hexdigest()[:16]


def prepare_work(out: Path, fp: dict) -> tuple[Path, str]:
    """The work folder for this fingerprint: kept (resume) when it matches, else cleared.
    Also removes what a killed run leaves behind (staging, temporaries)."""
    for pattern in [".annotate-staging-*"] + [f".{n}.tmp-*" for n in FINAL_NAMES] + [f".{n}.old-*" for n in FINAL_NAMES]:
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    work = out / WORK
    want = {k: digest(v) for k, v in fp.items()}
    marker = work / "fingerprint.json"
    note = "fresh"
    if marker.exists():
        try:
            had = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            had = {}
        if had == want:
            note = "resume"
        else:
            changed = [k for k in want if had.get(k) != want[k]] or ["fingerprint"]
            note = f"starting over: the unfinished run in {work} was for another {' / '.join(changed)}"
            shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    discard_unfinished(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "units").mkdir(exist_ok=True)
    if note != "resume":
        with atomic_path(marker) as tmp:  # a torn marker would throw every committed unit away
            tmp.write_text(json.dumps(want))
    return work, note


def discard_unfinished(work: Path) -> None:
    """Remove what no committed unit names: unit files being written (tmp/), unpublished outputs (publish-*)."""
    for p in (work / "tmp", *work.glob("publish-*")):
        shutil.rmtree(p, ignore_errors=True)


T = TypeVar("T")


def discarding_unfinished(work: Path, step: Callable[[], T]) -> T:
    """``step()``; if it fails, ``discard_unfinished`` first: after a full disk those files hold the space
    the rerun needs. Committed units stay, for the rerun to resume from."""
    try:
        return step()
    except BaseException:
        discard_unfinished(work)
        raise


def committed(work: Path) -> Iterator[dict]:
    """The sidecars of the committed units, in unit order."""
    for p in sorted((work / "units").glob("*.json")):
        yield json.loads(p.read_text())
