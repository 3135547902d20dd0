"""Random micro-batches by row index: our ``rowstore.RowReader`` (Parquet row groups) against Hugging
Face ``datasets`` (a memory-mapped Arrow file, ``ds[indices]``), at two table sizes.

What train-policy's workers do every step: read 8 rows at random positions of the training table.
Each reader runs in its own fresh process (so one's pages do not count to the other), builds nothing
(the tables are written first, once), and reads ``--reads`` micro-batches at seeded random
positions. Printed per reader and size: the process's RSS before opening the table, after opening
it, and after the reads (peak), and the median milliseconds per read.

    .venv/bin/python bench/row_reader.py --sizes 10000,1000000 --reads 2000

Memory-mapped pages of the Arrow file that a read touched count to RSS (they are file-backed and the
kernel may drop them); the peak is reported as is, with the anonymous part (RssAnon) beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = "the a cat river bread music train garden moon chess rain book kind clear useful warm".split()


def write_tables(n: int, folder: Path) -> tuple[Path, Path]:
    """The same n pairs as a Parquet file of 1024-row groups (ours) and an HF dataset saved to disk."""
    import numpy as np
    import pyarrow as pa

    from cwpo_ray.rowstore import ROW_GROUP, RowWriter

    parquet, arrow = folder / f"pairs-{n}.parquet", folder / f"hf-{n}"
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("weight", pa.float64())])

    def text(k):
        return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 30)) for _ in range(k)]

    with RowWriter(parquet, schema, ROW_GROUP) as out:
        for start in range(0, n, 50_000):
            k = min(50_000, n - start)
            out.write(pa.table({"id": [f"p{i}" for i in range(start, start + k)], "prompt": text(k), "chosen": text(k),
                                "rejected": text(k), "weight": rng.random(k)}, schema=schema))
    import datasets

    datasets.Dataset.from_parquet(str(parquet)).save_to_disk(str(arrow))
    return parquet, arrow


PROBE = r"""
import json, sys, time
import numpy as np
def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon"):
            out[k] = int(v.split()[0]) / 1024
    return out
kind, path, reads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import pyarrow  # both readers need it: imported before the first figure
if kind == "hf":
    import datasets
before = rss()
if kind == "ours":
    from cwpo_ray.rowstore import RowReader
    reader = RowReader(path)
    n = reader.num_rows
    take = lambda rows: reader.take(rows).to_pydict()
else:
    ds = datasets.load_from_disk(path)
    n = len(ds)
    take = lambda rows: ds[rows]
opened = rss()
rng = np.random.default_rng(1)
times = []
for _ in range(reads):
    rows = rng.integers(0, n, 8).tolist()
    t0 = time.perf_counter()
    batch = take(rows)
    times.append(time.perf_counter() - t0)
    assert len(batch["id"]) == 8
after = rss()
print(json.dumps({"before": before, "opened": opened, "after": after, "ms": 1000 * sorted(times)[len(times) // 2]}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--reads", type=int, default=2000)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        for n in [int(x) for x in args.sizes.split(",")]:
            parquet, arrow = write_tables(n, Path(tmp))
            for kind, path in (("ours", parquet), ("hf", arrow)):
                out = subprocess.run([sys.executable, "-c", PROBE, kind, str(path), str(args.reads)], check=True,
                                     capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((n, kind, r))
                print(n, kind, r, flush=True)
    print("\n| rows | reader | RSS before open MiB | after open | peak (VmHWM) | RssAnon after | ms per 8-row read |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, kind, r in rows:
        name = "rowstore.RowReader" if kind == "ours" else "datasets ds[indices]"
        print(f"| {n:,} | {name} | {r['before']['VmRSS']:.0f} | {r['opened']['VmRSS']:.0f} | {r['after']['VmHWM']:.0f} | "
              f"{r['after']['RssAnon']:.0f} | {r['ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
