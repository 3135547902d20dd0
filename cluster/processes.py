"""The processes of a local.sh cluster (or of one of its nodes): every process whose command line names
MARK (the node's Ray temp dir: raylets, GCS, dashboard, agents) and every descendant of one (Ray's
workers retitle themselves, so only their parentage says whose they are).

    python cluster/processes.py MARK     # their ids, space-separated (cluster/local.sh runs it)

tests/test_cluster.py imports it, to find a node's processes as `local.sh kill-node` does.
"""

from __future__ import annotations

import os
import sys


def tree_pids(mark: str) -> set[int]:
    parent, ours = {}, set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{p}/cmdline", "rb").read()
            parent[int(p)] = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if mark.encode() in cmdline:
            ours.add(int(p))
    while grown := {p for p, pp in parent.items() if pp in ours and p not in ours}:
        ours |= grown
    ours.discard(os.getpid())  # this script, when MARK is its argument
    return ours


if __name__ == "__main__":
    print(" ".join(map(str, sorted(tree_pids(sys.argv[1])))))
