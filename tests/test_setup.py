"""What setup.sh leaves behind beyond the packages themselves."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest

# Imported by every Ray Train worker and Ray process; each is hundreds of modules.
HEAVY = ["torch.nn.modules.module", "transformers.modeling_utils", "ray._private.worker", "sympy.core.basic",
         "pyarrow.parquet.core"]


@pytest.mark.parametrize("module", HEAVY)
def test_installed_packages_have_current_bytecode(module):
    """Where PYTHONDONTWRITEBYTECODE is set (CI, many container images) Python never writes .pyc
    files, so without setup.sh's compile step every process compiles these from source at each
    import (a training worker's imports 9.8 s instead of 4.1 s)."""
    spec = importlib.util.find_spec(module)
    source = Path(spec.origin)
    cache = Path(importlib.util.cache_from_source(str(source)))  # follows PYTHONPYCACHEPREFIX
    assert cache.exists(), f"no bytecode for {source}: run setup.sh again (it compiles .venv)"
    flags, mtime, size = struct.unpack("<III", cache.read_bytes()[4:16])
    if flags == 0:  # timestamp-based .pyc: stale if the source changed since
        stat = os.stat(source)
        assert (mtime, size) == (int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF), f"stale: {cache}"
