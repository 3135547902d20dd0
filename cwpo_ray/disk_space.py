"""Disk space: what a stage is estimated to keep on disk, the refusal of a stage that cannot fit, and a
full disk (ENOSPC) told in one line however deep in Ray it was raised.

The estimates are deliberately rough and on the large side; `cwpo preflight` sums them over a whole
pipeline (cluster_checks/plan.py), the pipeline checks each stage's before starting it
(orchestration/markers.py), a standalone `cwpo annotate` checks its own before it starts Ray
(recipes/annotate.py), and the `cwpo` command quotes a stage's when a disk fills under it (cli.py).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

CHECKPOINTS_KEPT = 2  # Ray Train's CheckpointConfig(num_to_keep) of both training stages (distributed.py)
# What a checkpoint upload leaves free: Ray Train then rewrites its checkpoint list (a few KB) and rank 0
# appends metric lines; a list cut short by a full disk stops the run from resuming (checkpoint_guard.py).
SPARE_BYTES = 2**20
# How a full disk reads where the errno is not kept: pyarrow's and safetensors' messages, a Ray Train
# or Ray Data error quoting a worker's traceback.
NO_SPACE_TEXT = re.compile(r"No space left on device|\[Errno 28\]|errno 28|os error 28|StorageFull")
# A .jsonl.gz input's outputs are Parquet of its text, which gzip shrinks about 3x (English JSONL; Parquet's
# own compression, about half of that): counted at its text, as the other inputs are.
GZIP_TEXT_RATIO = 3
PATH_IN_TEXT = re.compile(r"No space left on device(?: \([^)]*\))?: '([^']+)'")  # an OSError's str


# ----------------------------------------------------------------------------- estimates (pure)

def checkpoint_bytes(model: int, lora: bool = False, kept: int = CHECKPOINTS_KEPT) -> int:
    """Ray Train's checkpoints of one training run at their peak: the ``kept`` ones and the next being
    written (Ray deletes the oldest only once the new one is registered). Each holds the fp32 weights
    and AdamW's two moments, 3x ``model`` (the fp32 model's bytes); with LoRA ~1x (the weights; the
    adapters' moments are small)."""
    return (kept + 1) * (1 if lora else 3) * model


def training_bytes(model: int, lora: bool = False, saves: int = 1, table: int = 0, checkpoints: bool = True) -> int:
    """A train-policy or train-annotator run: its checkpoints at their peak (``checkpoint_bytes``; they
    are removed only after the final save; not counted when they go elsewhere: ``checkpoints`` False for
    a storage_path), ``saves`` saved fp32 models of 1x ``model`` each (SFT's and the policy; the
    annotator), and its copy of the training table (``table``: the input's bytes)."""
    return checkpoint_bytes(model, lora) * checkpoints + saves * model + table


def tables_bytes(input_bytes: int) -> int:
    """A table stage (data, annotate): 2x its input's bytes. annotate's unit files and its final files
    coexist until publication; data's new tables sit beside the old ones until each is replaced (a
    rerun into the same OUT), and the pipeline's data stage adds copies of the unlabeled split.
    The output is taken to be no larger than the input (the same text, as Parquet)."""
    return 2 * input_bytes


# ----------------------------------------------------------------------------- sizes on disk

def input_bytes(path: str | os.PathLike) -> int:
    """The bytes of text a local file or folder of files holds (a gzip'ed file counts ``GZIP_TEXT_RATIO``
    times its size); 0 for what is not here (a hub id, a URI)."""
    from cwpo_ray.fingerprints import files_of

    return sum(size * (GZIP_TEXT_RATIO if Path(f).name.endswith(".gz") else 1) for f, size, _ in files_of(path))


def model_bytes(spec: str, gguf_file: str | None) -> tuple[int, bool]:
    """(fp32 bytes, is GGUF) of a model as the driver finds it (0: a hub id, a missing folder): from the
    safetensors headers' shapes, else the .bin files' sizes; GGUF ~6x its file (4-5 bit weights)."""
    import json
    import math

    from cwpo_ray.models import resolve_model

    try:
        source = resolve_model(spec, gguf_file)
    except (FileNotFoundError, OSError):
        return 0, False
    folder = Path(source.path)
    if source.gguf_file:
        return 6 * (folder / source.gguf_file).stat().st_size, True
    total = 0
    for f in folder.glob("*.safetensors") if folder.is_dir() else ():
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(4 * math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total or sum(f.stat().st_size for f in folder.glob("*.bin")), False


def start_model_bytes(model: str, gguf_file: str | None) -> int:
    """What the pipeline's start stage writes: a GGUF model dequantized to an fp32 folder; nothing for a
    model that is already a folder (it is used where it is)."""
    size, gguf = model_bytes(model, gguf_file)
    return size if gguf else 0


def policy_bytes(model: str, gguf_file: str | None, lora: bool, sft: bool, data: str, storage_path: str = "") -> int:
    """``training_bytes`` of a train-policy run from ``model`` on the table ``data`` (SFT saves a model too)."""
    return training_bytes(model_bytes(model, gguf_file)[0], lora, saves=1 + sft, table=input_bytes(data),
                          checkpoints=not storage_path)


def annotator_bytes(model: str, gguf_file: str | None, data: str, fold_models: int = 0, storage_path: str = "") -> int:
    """``training_bytes`` of a train-annotator run, plus ``fold_models`` more models (keep_fold_models)."""
    size = model_bytes(model, gguf_file)[0]
    return training_bytes(size, table=input_bytes(data), checkpoints=not storage_path) + fold_models * size


def stage_need(command: str, cfg) -> int:
    """Bytes `cwpo COMMAND` with ``cfg`` is estimated to write under its output folder (0: no estimate)."""
    if command == "data":
        return tables_bytes(input_bytes(cfg.source.partition(":")[2]))
    if command == "annotate":
        return tables_bytes(input_bytes(cfg.data))
    if command == "train-policy":
        return policy_bytes(cfg.model, cfg.gguf_file, cfg.lora, cfg.sft_epochs > 0, cfg.data, cfg.storage_path)
    if command == "train-annotator":
        kept = cfg.folds * cfg.epochs if cfg.keep_fold_models else 0  # k x epochs at the peak, as preflight counts
        return annotator_bytes(cfg.model, cfg.gguf_file, cfg.data, kept, cfg.storage_path)
    return 0


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the disk of ``folder``, measured at its nearest existing parent (it may not exist yet)."""
    probe = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
    return shutil.disk_usage(probe).free


def folder_bytes(folder: str | os.PathLike) -> int:
    """What the files under ``folder`` take (0 when it does not exist)."""
    from cwpo_ray.fingerprints import files_of

    return sum(size for _, size, _ in files_of(folder))


def human(n: int) -> str:
    """Bytes for a person: 1.50 GB, 12.0 MB, 640 KB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


# ----------------------------------------------------------------------------- the one-line error

class NotEnoughSpace(Exception):
    """A disk too small for a stage: found before it starts (``stage`` named), or met while it wrote.
    ``need`` is the stage's estimate (0: none); ``under_out``: the folder is the output folder's (else
    Ray's or the system's temporary space)."""

    def __init__(self, folder: str, need: int, free: int, stage: str = "", under_out: bool = True):
        self.folder, self.need, self.free, self.stage, self.under_out = folder, need, free, stage, under_out
        sizes = (f"{human(free)} free" if not need else f"needs ~{human(need)}, {human(free)} free" if need > free
                 else f"needs more than the ~{human(need)} estimated, {human(free)} free")
        fix = "free space or give another out" if under_out else "free space there"
        super().__init__(f"not enough space on {folder} for {stage} ({sizes}): {fix}" if stage
                         else f"no space left on {folder} ({sizes}): {fix}")


def require_space(folder: str | os.PathLike, need: int, stage: str, held: str | os.PathLike | None = None) -> None:
    """Raise NotEnoughSpace unless ``folder``'s disk has ``need`` bytes free; what the folder already holds
    counts toward it (a resumed stage's checkpoints or committed units), or only what ``held`` holds when
    given (a folder under it: standalone annotate's work folder; its published outputs stay until the new
    ones replace them, so they do not count)."""
    missing = need - folder_bytes(folder if held is None else held)
    free = free_bytes(folder)
    if missing > free:
        raise NotEnoughSpace(str(folder), missing, free, stage=stage)


def causes(exc: BaseException):
    """``exc`` and every error it wraps: chained ones, a Ray task's cause, a Ray Train worker group's failures."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None),
                 *(failures.values() if isinstance(failures, dict) else ())]


def full_disk(exc: BaseException) -> tuple[bool, str]:
    """(whether ``exc`` or an error it wraps is a full disk, the path it names or ""). The errno where
    an OSError kept it, else the text: Ray hands a worker's error to the driver wrapped, its cause at
    times only quoted, and pyarrow and safetensors keep the errno only in their messages."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            found = PATH_IN_TEXT.search(str(e))
            return True, str(e.filename or (found.group(1) if found else ""))
        if NO_SPACE_TEXT.search(str(e)):
            found = PATH_IN_TEXT.search(str(e))
            return True, found.group(1) if found else ""
    return False, ""


def shown_folder(path: str, out: str | os.PathLike) -> tuple[str, bool]:
    """(the folder to name, whether it is under ``out``): ``out`` itself for a path under it (what the
    user gave), else the path's nearest existing folder."""
    base = Path(out).absolute()
    if not path:
        return str(base), True
    where = Path(path).absolute()
    if where == base or base in where.parents:
        return str(base), True
    folder = next(p for p in (where, *where.parents) if p.is_dir())
    return str(folder), False


def no_space_error(exc: BaseException, out: str | os.PathLike, need: int) -> NotEnoughSpace | None:
    """The one-line error for ``exc`` when it is a full disk met writing under ``out`` (None: it is not)."""
    for e in causes(exc):
        if isinstance(e, NotEnoughSpace):
            return e
    hit, path = full_disk(exc)
    if not hit:
        return None
    folder, under_out = shown_folder(path, out)
    return NotEnoughSpace(folder, need, free_bytes(folder), under_out=under_out)


def command_error(exc: BaseException, command: str, cfg) -> NotEnoughSpace | None:
    """``no_space_error`` for `cwpo COMMAND`: its output folder and its estimate (``stage_need``)."""
    try:
        need = stage_need(command, cfg) if cfg is not None else 0
    except Exception:  # noqa: BLE001 - the estimate only adds to the message
        need = 0
    return no_space_error(exc, getattr(cfg, "out", None) or ".", need)
