"""Train the strong policy: optional SFT, then confidence-weighted DPO / IPO / rDPO (Ray Train).

PAIRS (--data) is an annotated table (id, prompt, chosen, rejected, reward_chosen,
reward_rejected, confidence, annotator) or a labeled table (id, prompt, chosen, rejected:
human labels, weight 1). Pair weights (--weighting): `confidence` = the annotator's
confidence C (the paper's CW-PO; 1 for a labeled table), `none` = uniform weights,
`topk:F` = keep only the fraction F most confident pairs, uniform weights. The loss is
mean(weight * per-pair loss) over the batch, as in the paper.

Steps, all under --out DIR:
  1. DIR/train_pairs.parquet: the kept pairs and their `weight`.
  2. SFT on (prompt, chosen) for --sft-epochs epochs (0 skips it) -> DIR/sft.
  3. PO from the same start (DIR/sft, else --model), which is also the reference: before
     the first step the training workers score every pair once without gradients
     (DIR/reference.parquet), so PO never holds a second model in memory; with
     --reference-cache, responses an earlier run scored from the same start are reused.
     -> DIR/policy (merged LoRA if --lora), loadable with AutoModelForCausalLM as is.
  Per-step metrics: DIR/metrics.jsonl (rank 0, one JSON object a line), logged to the MLflow run
     by the driver as they come.
  2 and 3 are one Ray Train run (one worker group, started once); a restarted group skips SFT
  once DIR/sft is saved, and each phase resumes only from its own checkpoints.

Data path (memory does not grow with the number of pairs, in the driver or a worker): the
driver streams PAIRS into DIR/train_pairs.parquet in row groups of 1024 rows (topk:F by an exact
histogram threshold, no sort of the table); each worker reads, per micro-batch, only the row
groups its rows fall in (``BatchReader``), and the reference log-probs are a table of the same
rows in the same row groups, joined per micro-batch by row index (no gather between workers).
Which rows a worker trains on at a step is ``StepPlan``: the epoch's seeded permutation of the
rows, so a resumed run, on any worker, reads the same rows: ``torch.randperm``'s up to 2^16 rows (the
order every published run trained in, at most 512 KiB), above that a Feistel permutation computed for
the step's positions only (``rowstore.permuted``: no n-entry index). Why not Ray Data
(``datasets=`` / ``get_dataset_shard``): its streaming split hands each worker the blocks that
come, in an order that depends on timing, and resuming mid-epoch would mean replaying the stream;
training here needs "rows P..Q of epoch E's order on rank R", deterministic, which is random
access by row index, and Parquet row groups give that with only a footer in memory.

Prompts are put in the model's chat format when its tokenizer has a chat template (as `cwpo
evaluate` generates; --no-chat-template keeps plain text). Truncation rule: the prompt is cut
from the LEFT to --max-prompt-length tokens, then the response (EOS appended) is cut from the
RIGHT so prompt + response fits --max-length; at least one response token is kept. The loss covers response tokens only. A pair goes through
the model as prompt | chosen | rejected in one row, with an attention mask that keeps rejected
from seeing chosen; pairs of a batch with the same prompt share it, several pairs share a row
(``logprobs.pair_batch``): the same log-probs as two sequences per pair, fewer tokens computed.

Batches: each optimizer step takes --grad-accumulation micro-batches of --batch-size pairs per
worker (the global batch is the same data whatever the worker count, and N workers x K
micro-batches give the same update as N*K workers); an epoch drops the last incomplete
global batch. Checkpoints every --checkpoint-every steps; a failed worker is restarted (--max-failures) and training
resumes from the last checkpoint at its step, with the optimizer and schedule state.
Rerunning the same command into the same DIR continues where it stopped (--no-resume
starts over). DIR must be on storage every worker can read and write. Metrics go to MLflow
(MLFLOW_TRACKING_URI, else ./mlflow/store) with TRL's names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from cwpo_ray.config import option
from cwpo_ray.distributed import DistributedConfig
from cwpo_ray.losses import LOSS_TYPES

METRICS_FILE = "metrics.jsonl"  # rank 0's per-step metrics (one JSON object a line), relayed to MLflow
SAVE_ERROR_FILE = "save_error.txt"  # why the final save failed, from rank 0 to the driver
PACKING_CHOICES = ("auto", "shared_prefix", "separate")
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")

EPILOG = """examples:
  cwpo train-policy --data runs/annotated.parquet --model smollm2-135m --out runs/cw-dpo
  cwpo train-policy --data runs/data/unlabeled_human.parquet --model smollm2-135m --out runs/human-ipo \\
      --loss ipo --weighting none --num-workers 4 --strategy deepspeed --zero-stage 3
  cwpo train-policy --data runs/annotated.parquet --model my/folder --out runs/top30 --weighting topk:0.3 --lora
"""


@dataclass
class Settings(DistributedConfig):
    """How the policy is trained: everything but its inputs, outputs, the arm (loss, weighting) and
    run bookkeeping. The pipeline's ``policy`` section is this class: one name and default per option."""

    model: str = option("smollm2-135m", "policy start: a local folder, a hub id, a .gguf file or smollm2-135m")
    gguf_file: Optional[str] = option(None, "GGUF file inside --model's folder")
    beta: float = option(0.5, "PO temperature beta")
    epsilon: float = option(0.1, "rDPO label-noise rate")
    epochs: int = option(1, "PO epochs")
    # The paper's values (lr 5e-6, 100 warm-up steps); the built-in presets, with far fewer steps,
    # set their own.
    lr: float = option(5e-6, "PO peak learning rate (cosine schedule after warm-up)")
    warmup_steps: int = option(100, "linear warm-up steps (capped at 10%% of the steps when there are fewer)")
    weight_decay: float = option(0.05, "AdamW weight decay (PO and SFT)")
    batch_size: int = option(8, "pairs per worker per forward pass (micro-batch)")
    grad_accumulation: int = option(1, "micro-batches per optimizer step (global batch = batch_size x "
                                       "grad_accumulation x num_workers)")
    max_length: int = option(512, "max tokens of prompt + response")
    max_prompt_length: int = option(256, "max prompt tokens (cut from the left)")
    max_steps: Optional[int] = option(None, "stop each stage after this many steps (smoke tests, benchmarks)")
    chat_template: bool = option(True, "prompts in the model's chat format when its tokenizer has one (as "
                                       "`cwpo evaluate` generates); --no-chat-template: plain text")
    sft_epochs: int = option(3, "SFT epochs on (prompt, chosen) before PO; 0 skips SFT")
    sft_lr: float = option(1e-5, "SFT peak learning rate")
    lora: bool = option(False, "train LoRA adapters (merged into the saved model)")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: str = option("", "comma-separated module names for LoRA (empty: peft's default for the model)")
    checkpoint_every: int = option(50, "checkpoint every N optimizer steps")
    ref_batch_size: int = option(16, "pairs per worker per batch in the reference log-prob pass")
    packing: str = option("auto", "how a pair's two sequences go through the model: separate (each in its own "
                                  "row: any attention kernel, e.g. flash_attention_2) or shared_prefix (prompt | "
                                  "chosen | rejected in one row with a 4D mask: fewer tokens, sdpa/eager only); "
                                  "auto: separate on GPUs, shared_prefix on CPU", choices=PACKING_CHOICES)
    attn_implementation: str = option("sdpa", "the policy's attention: sdpa, eager or flash_attention_2 "
                                              "(GPU, packing separate)", choices=ATTENTION_CHOICES)

    def validate(self) -> None:
        from cwpo_ray.logprobs import Lengths

        super().validate()
        Lengths(self.max_prompt_length, self.max_length)
        for name in ("epochs", "batch_size", "grad_accumulation", "num_workers", "checkpoint_every", "ref_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sft_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("sft_epochs and warmup_steps must be >= 0")
        if not self.beta > 0 or not 0 <= self.epsilon < 0.5:
            raise ValueError(f"need beta > 0 and 0 <= epsilon < 0.5, got {self.beta}, {self.epsilon}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.packing not in PACKING_CHOICES:
            raise ValueError(f"packing must be one of {', '.join(PACKING_CHOICES)}, got {self.packing!r}")
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise ValueError(f"attn_implementation must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attn_implementation!r}")
        if self.resolved_packing() == "shared_prefix" and self.attn_implementation == "flash_attention_2":
            raise ValueError("flash_attention_2 takes no 4D mask: set packing separate (or attn_implementation sdpa)")

    def resolved_packing(self) -> str:
        """``packing`` with auto decided: separate where the policy trains on GPUs (fused attention
        kernels need the plain mask), shared_prefix on CPUs, where fewer tokens is what counts."""
        if self.packing != "auto":
            return self.packing
        return "separate" if self.use_gpu else "shared_prefix"


@dataclass(kw_only=True)
class Config(Settings):
    data: str = option(help="annotated or labeled pair table (.parquet/.jsonl file or folder)", must_exist=True)
    out: str = option(help="output folder (sft/, policy/, train_pairs.parquet, reference.parquet, manifest.json)")
    loss: str = option("dpo", "per-pair loss", choices=LOSS_TYPES)
    weighting: str = option("confidence", "pair weights: none, confidence, confidence_raw (uncalibrated) or topk:F")
    resume: bool = option(True, "continue from DIR's last checkpoints; --no-resume starts over")
    keep_checkpoints: bool = option(False, "keep DIR/ray, Ray Train's checkpoints, once the run has finished "
                                           "(by default deleted after the final save: weights and AdamW moments, "
                                           "~3x the model, per run; a finished DIR run again then trains again)")
    reference_cache: str = option("", "folder of reference log-probs shared by runs from the same start model "
                                      "(responses scored before are not scored again)")
    seed: int = option(0, "seed of initialization, data order and LoRA")
    experiment: str = option("cwpo", "MLflow experiment")
    run_name: str = option("", "MLflow run name (default: train-policy-LOSS-WEIGHTING)")
    parent_run_id: str = option("", "MLflow parent run id (the pipeline's)")
    progress: bool = option(True, "tqdm progress bar on rank 0")
    fail_at_step: int = option(-1, "testing: the last worker fails once at this PO step", flag=False)

    def validate(self) -> None:
        from cwpo_ray.weighting import parse_weighting

        super().validate()
        parse_weighting(self.weighting)


@dataclass
class Job:
    """What one phase (SFT or PO) of ``train_loop`` needs besides the stage's config."""

    cfg: Config
    mode: str                 # "sft" or "po"
    model_path: str
    gguf_file: Optional[str]
    table: str                # train_pairs.parquet
    save_to: str
    lr: float
    warmup_steps: int
    plan: "StepPlan"
    metrics_file: str         # rank 0's metrics, relayed to MLflow by the driver
    reference_table: str

    @property
    def lengths(self):
        from cwpo_ray.logprobs import Lengths

        return Lengths(self.cfg.max_prompt_length, self.cfg.max_length, self.cfg.chat_template)

    def reference(self, precision: str = "fp32") -> "ReferenceSpec":
        """Where the reference log-probs go; keyed by the start model as it is on disk when PO begins
        (after SFT, in the same Ray Train run, DIR/sft exists only then) and the precision they are
        computed in (the worker's, resolved)."""
        from cwpo_ray.models import ModelSource

        key = reference_key(ModelSource(self.model_path, self.gguf_file), self.cfg, precision)
        return ReferenceSpec(self.reference_table, self.lengths, self.cfg.ref_batch_size, self.cfg.reference_cache,
                             key, self.cfg.resolved_packing())


@dataclass
class ReferenceSpec:
    """Where and how the reference log-probs of a PO run are computed and kept."""

    table: str            # DIR/reference.parquet
    lengths: "object"     # logprobs.Lengths: how pairs are tokenized
    batch_size: int
    cache_dir: str        # shared across runs from the same start ("" : none)
    cache_key: str        # the start model and tokenization (reference_key)
    packing: str = "shared_prefix"  # logprobs.pair_batch's packing


# ----------------------------------------------------------------------------- the recipe

def run(cfg: Config) -> int:
    from cwpo_ray import tracking
    from cwpo_ray.distributed import prepare_train_driver
    from cwpo_ray.models import ModelSource, resolve_model
    from cwpo_ray.ray_env import init_ray

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for stale in ("ray", "sft", "policy", "reference.parquet", "reference", "mlflow_run_id", METRICS_FILE):
            _remove(out / stale)
        _remove(tracking.relay_mark(out / METRICS_FILE))
    _remove(out / SAVE_ERROR_FILE)
    start = resolve_model(cfg.model, cfg.gguf_file)
    n_pairs = write_train_pairs(cfg, out / "train_pairs.parquet")
    init_ray(meanwhile=functools.partial(prepare_train_driver, cfg.experiment))

    # A rerun into the same DIR continues the same MLflow run, as a restarted worker does.
    run_id_file = out / "mlflow_run_id"
    old_run_id = _existing_run(run_id_file, tracking.tracking_uri())
    with tracking.start_run(cfg.experiment, cfg.run_name or f"train-policy-{cfg.loss}-{cfg.weighting}",
                            run_id=old_run_id, parent_run_id=cfg.parent_run_id or None,
                            tags={"stage": "train-policy"}) as mlrun:
        run_id_file.write_text(mlrun.info.run_id)
        if old_run_id is None:
            tracking.log_config(cfg)

        # SFT on (prompt, chosen): the PO start and its reference. Then confidence-weighted PO, whose
        # workers first compute the reference log-probs once (DIR/reference.parquet), so PO never
        # holds a second model. Both phases run in one Ray Train run, on one worker group.
        jobs = []
        if cfg.sft_epochs > 0:
            jobs.append(make_job(cfg, "sft", start, out / "train_pairs.parquet", out / "sft", n_pairs))
            start = ModelSource(str(out / "sft"))
        jobs.append(make_job(cfg, "po", start, out / "train_pairs.parquet", out / "policy", n_pairs))
        result = train_phases(cfg, jobs, mlrun.info.run_id)
    if not cfg.keep_checkpoints and not cfg.storage_path:
        # The saved model supersedes them; kept, a pipeline's arms x seeds filled 48 GB at 135M.
        _remove(out / "ray")

    manifest = {"stage": "train-policy", "config": asdict(cfg), "pairs": n_pairs, "start": str(start),
                "sft": str(out / "sft") if cfg.sft_epochs > 0 else None, "policy": str(out / "policy"),
                "reference_table": str(out / "reference.parquet"), "mlflow_run_id": mlrun.info.run_id,
                "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"train-policy: {n_pairs} pairs -> {out / 'policy'} (MLflow run {mlrun.info.run_id})")
    return 0


# ----------------------------------------------------------------------------- data

PAIR_SCHEMA_FIELDS = [("id", "string"), ("prompt", "string"), ("chosen", "string"), ("rejected", "string"),
                      ("weight", "float64")]
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")


def _schema(fields):
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in fields])


def write_train_pairs(cfg: Config, path: Path) -> int:
    """The kept pairs with their weight column, streamed into row groups of ``ROW_GROUP`` rows;
    returns how many. Memory: one input row group (a batch of 65,536 rows for JSONL) and one output
    row group, whatever the table's size.

    topk:F keeps the ceil(F * n) most confident pairs, ties broken by row order (as
    ``weighting.pair_weights``): ``topk_selection`` finds the threshold confidence and how many
    rows equal to it are kept, with a fixed-size histogram pass per 16 bits of the values (at most
    4 passes over the confidence column), then one pass writes the kept rows in input order.
    """
    import numpy as np
    import pyarrow as pa

    from cwpo_ray.rowstore import ROW_GROUP, RowWriter, iter_column_batches, topk_keep, topk_selection
    from cwpo_ray.tables import LABELED_COLUMNS, require_columns
    from cwpo_ray.weighting import confidence_column, parse_weighting

    names = require_columns(cfg.data, LABELED_COLUMNS)
    column = confidence_column(cfg.weighting)  # confidence, or confidence_raw (the cw_raw arm)
    annotated = "confidence" in names
    if annotated and column not in names:
        raise ValueError(f"weighting {cfg.weighting} needs a {column} column; {cfg.data} has none (annotated "
                         "before calibration existed: annotate it again)")
    kind, fraction = parse_weighting(cfg.weighting)
    if kind == "topk" and not annotated:
        raise ValueError("weighting topk:F needs an annotated table (a confidence column)")

    def confidences():
        for batch in iter_column_batches(cfg.data, [column]):
            c = batch.column(column)
            values = c.to_numpy(zero_copy_only=False).astype(np.float64) if c.null_count == 0 else None
            if values is None or not ((values >= 0) & (values <= 1)).all():  # NaN fails too
                raise ValueError(f"{cfg.data}: {column} must be in [0, 1] on every row")
            yield values

    threshold, ties = None, 0
    if kind == "topk":
        n = sum(len(v) for v in confidences())
        k = max(1, -(-int(round(fraction * n * 1e6)) // 1_000_000))  # weighting.pair_weights's k
        threshold, ties = topk_selection(confidences, k)
    columns = list(LABELED_COLUMNS) + ([column] if annotated else [])
    with RowWriter(path, _schema(PAIR_SCHEMA_FIELDS), ROW_GROUP) as out:
        for batch in iter_column_batches(cfg.data, columns):
            weights = np.ones(batch.num_rows)
            if annotated:
                c = batch.column(column)
                weights = c.to_numpy(zero_copy_only=False).astype(np.float64) if c.null_count == 0 else None
                if weights is None or not ((weights >= 0) & (weights <= 1)).all():
                    raise ValueError(f"{cfg.data}: {column} must be in [0, 1] on every row")
            if kind == "topk":
                keep, ties = topk_keep(weights, threshold, ties)
                batch, weights = batch.filter(pa.array(keep)), np.ones(int(keep.sum()))
            elif kind == "none":
                weights = np.ones(batch.num_rows)
            out.write(batch.select(list(LABELED_COLUMNS)).append_column("weight", pa.array(weights, pa.float64())))
        kept = out.count
        if kept < cfg.batch_size * cfg.grad_accumulation * cfg.num_workers:  # raised inside: no file published
            raise ValueError(f"{kept} pairs is fewer than one global batch ({cfg.batch_size} x "
                             f"{cfg.grad_accumulation} micro-batches x {cfg.num_workers} workers)")
    return kept


def ensure_reference(engine, tokenizer, pairs: str, spec: ReferenceSpec, rank: int, world_size: int) -> None:
    """Writes ``spec.table``: per row of the pair table ``pairs`` (in its order, in the same row
    groups) its id, ref_chosen_logps / ref_rejected_logps and token counts, computed once.

    Computed here, by the training workers themselves, before the first PO step: they
    already hold the start model, which IS the reference, so the pass costs no second
    model and no extra processes, and it runs under the same placement (ZeRO-3 sharding,
    GPUs) as training, so a reference too big for one device still fits.

    Streaming, in rounds: in round j worker r scores row group j * world_size + r of ``pairs``
    (rows still to score, in batches of similar length: less padding), and appends the group's
    values to its own part, DIR/reference/part-RANK.parquet (published atomically). Every worker
    runs the same number of forwards each round (ZeRO-3 forwards are collective): one with fewer
    repeats a row and throws the result away. After a barrier rank 0 copies the parts' groups, in
    row order, into ``spec.table``; training then reads the rows of each micro-batch by index.
    Nothing is gathered between workers but per-round batch counts.

    With --reference-cache, responses another run already scored from the same start model
    at the same lengths are taken from the cache (the pipeline's human / ws / cw arms score
    the same texts): looked up CACHE_CHUNK_GROUPS row groups at a time (``ReferenceCache``).
    """
    import numpy as np
    import pyarrow as pa

    from cwpo_ray import logprobs
    from cwpo_ray.distributed import barrier, sum_over_workers
    from cwpo_ray.rowstore import RowReader, RowWriter

    path = Path(spec.table)
    if path.exists():
        return
    t0 = time.perf_counter()
    device = next(logprobs._innermost(engine).parameters()).device  # collectives on it (NCCL needs the GPU)
    reader = RowReader(pairs, columns=["id", "prompt", "chosen", "rejected"], cache_groups=1)
    cache = ReferenceCache(spec.cache_dir, spec.cache_key) if spec.cache_dir else None
    schema = _schema([("id", "string")] + [(c, "float64" if "logps" in c else "int64") for c in REFERENCE_COLUMNS])
    parts = path.with_suffix("")
    rounds = -(-reader.num_groups // world_size)
    dummy = reader.take([0]).to_pydict()
    computed = 0
    engine.eval()
    with RowWriter(parts / f"part-{rank}.parquet", schema) as part:
        for first in range(0, rounds, CACHE_CHUNK_GROUPS):
            mine = [g for g in (j * world_size + rank for j in range(first, min(rounds, first + CACHE_CHUNK_GROUPS)))
                    if g < reader.num_groups]
            known = _cache_lookup(cache, reader, mine)
            new_entries = []
            for j in range(first, min(rounds, first + CACHE_CHUNK_GROUPS)):
                g = j * world_size + rank
                rows = reader.group(g).to_pydict() if g < reader.num_groups else None
                values, todo = _score_group(engine, tokenizer, rows, known.pop(g, None), dummy, spec, device)
                if rows:
                    part.write_group(pa.table({"id": rows["id"], **values}, schema=schema))
                    computed += len(todo)
                    if cache is not None and todo:
                        new_entries.append(_cache_entries(rows, values, todo))
            if cache is not None and new_entries:
                cache.add_segment(*(np.concatenate(cols) for cols in zip(*new_entries)))
    engine.train()
    barrier()
    if rank == 0:
        part_readers = [RowReader(parts / f"part-{r}.parquet", cache_groups=1) for r in range(world_size)]
        with RowWriter(path, schema) as merged:
            for g in range(reader.num_groups):  # group g is part g % world_size's group g // world_size
                merged.write_group(part_readers[g % world_size].group(g // world_size))
        shutil.rmtree(parts, ignore_errors=True)
    total = int(sum_over_workers([computed], device)[0])
    barrier()
    if rank == 0:
        n = reader.num_rows
        print(f"train-policy: reference log-probs of {n} pairs ({total} computed, {n - total} from "
              f"the cache) in {time.perf_counter() - t0:.1f}s -> {path}")


def _score_group(engine, tokenizer, rows: Optional[dict], known, dummy: dict, spec: ReferenceSpec, device):
    """One round of the reference pass on one worker: the values of ``rows`` (a row group; None when
    this worker has none this round), from ``known`` (the cache's hits) or scored; and which rows
    were scored. Runs as many forwards as the busiest worker (collective)."""
    import numpy as np

    from cwpo_ray import logprobs
    from cwpo_ray.distributed import max_over_workers

    n = len(rows["id"]) if rows else 0
    values = {c: np.zeros(n, dtype=np.float64 if "logps" in c else np.int64) for c in REFERENCE_COLUMNS}
    todo = list(range(n))
    if known is not None:
        hit, found = known
        for c in REFERENCE_COLUMNS:
            values[c][:] = found[c]
        todo = [i for i in range(n) if not hit[i]]
    # Pairs with the same prompt in the same batch (pair_batch computes a shared prompt once), prompts of
    # similar length together (rows pack with less padding).
    todo.sort(key=lambda i: (len(rows["prompt"][i]), rows["prompt"][i],
                             len(rows["chosen"][i]) + len(rows["rejected"][i])))
    bs = spec.batch_size
    for b in range(int(max_over_workers([-(-len(todo) // bs)], device)[0])):
        idx = todo[b * bs:(b + 1) * bs]
        use, src = (idx, rows) if idx else ([0], dummy)  # a worker with nothing left scores a row for nothing
        out = logprobs.reference_logps(engine, tokenizer, [src["prompt"][i] for i in use],
                                       [src["chosen"][i] for i in use], [src["rejected"][i] for i in use],
                                       spec.lengths, spec.packing)
        for c in REFERENCE_COLUMNS:
            values[c][idx] = out[c][:len(idx)]
    return values, todo


# Row groups of the pair table looked up in the reference cache at once: each lookup reads the
# cache once, so bigger chunks mean fewer reads; a chunk holds 2 x 1024 keys per group (~100 B each).
CACHE_CHUNK_GROUPS = 64


def _cache_lookup(cache, reader, groups: list[int]) -> dict:
    """{group: (hit per row, values per row)} for the rows of ``groups`` whose responses are both in
    the cache; {} without a cache."""
    import numpy as np

    if cache is None or not groups:
        return {}
    keys, sizes = [], []
    for g in groups:
        rows = reader.group(g).to_pydict()
        for side in ("chosen", "rejected"):
            keys.append(np.array([ReferenceCache.key(p, r) for p, r in zip(rows["prompt"], rows[side])], dtype="S32"))
        sizes.append(len(rows["id"]))
    found, logps, tokens = cache.lookup(np.concatenate(keys))
    known, at = {}, 0
    for g, n in zip(groups, sizes):
        c, r = slice(at, at + n), slice(at + n, at + 2 * n)
        known[g] = (found[c] & found[r], {"ref_chosen_logps": logps[c], "ref_rejected_logps": logps[r],
                                          "chosen_tokens": tokens[c], "rejected_tokens": tokens[r]})
        at += 2 * n
    return known


def _cache_entries(rows: dict, values: dict, todo: list[int]):
    """(keys, logps, tokens) of the responses of the rows ``todo`` just scored."""
    import numpy as np

    keys = [ReferenceCache.key(rows["prompt"][i], rows[side][i]) for side in ("chosen", "rejected") for i in todo]
    logps = np.concatenate([values[f"ref_{side}_logps"][todo] for side in ("chosen", "rejected")])
    tokens = np.concatenate([values[f"{side}_tokens"][todo] for side in ("chosen", "rejected")])
    return np.array(keys, dtype="S32"), logps, tokens


class ReferenceCache:
    """Reference log-probs of (prompt, response) texts under one start model and one truncation.

    A folder per (model, tokenization) fingerprint in a shared folder, of Parquet segments:
    key (a hash of the prompt and the response), logps, tokens, each segment sorted by key with
    row-group statistics. A run adds one segment per worker per lookup chunk of responses it
    scored (atomically; segments are never rewritten, so concurrent runs never lose each other's).
    ``lookup`` streams the segments' row groups (skipping those whose key range misses the
    keys asked) and joins them to a sorted batch of keys: memory is one row group and the batch,
    not the cache. The cost is a read of the cache per lookup (so per CACHE_CHUNK_GROUPS x 1024
    pairs); the file of earlier versions, reference-KEY.parquet (sorted by key), is read as a segment.
    """

    GROUP_ROWS = 65536

    def __init__(self, folder: str, model_key: str):
        self.folder = Path(folder) / f"reference-{model_key}"
        self.legacy = Path(folder) / f"reference-{model_key}.parquet"

    @staticmethod
    def key(prompt: str, response: str) -> str:
        import hashlib

        return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:32]

    def segments(self) -> list[Path]:
        found = sorted(self.folder.glob("seg-*.parquet")) if self.folder.is_dir() else []
        return ([self.legacy] if self.legacy.exists() else []) + found

    def lookup(self, keys):
        """(found, logps, tokens) for each of ``keys`` (numpy bytes 'S32'), in their order."""
        import numpy as np
        import pyarrow.parquet as pq

        order = np.argsort(keys, kind="stable")
        want = keys[order]
        found = np.zeros(len(keys), dtype=bool)
        logps, tokens = np.zeros(len(keys)), np.zeros(len(keys), dtype=np.int64)
        if not len(keys):
            return found, logps, tokens
        lo, hi = want[0].decode(), want[-1].decode()
        for segment in self.segments():
            f = pq.ParquetFile(segment)
            for g in range(f.metadata.num_row_groups):
                stats = f.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max and (stats.max < lo or stats.min > hi):
                    continue
                t = f.read_row_group(g, columns=["key", "logps", "tokens"])
                have = t.column("key").to_numpy(zero_copy_only=False).astype("S32")
                at = np.searchsorted(have, want).clip(max=len(have) - 1)
                hit = have[at] == want
                sel = order[hit]
                found[sel] = True
                logps[sel] = t.column("logps").to_numpy()[at[hit]]
                tokens[sel] = t.column("tokens").to_numpy()[at[hit]]
        return found, logps, tokens

    def add_segment(self, keys, logps, tokens) -> None:
        """A new segment of these entries (numpy arrays; keys 'S32'), sorted by key, duplicates dropped."""
        import uuid

        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from cwpo_ray.tables import atomic_path

        keys, first = np.unique(keys, return_index=True)
        table = pa.table({"key": pa.array(keys.astype(str), pa.string()), "logps": pa.array(logps[first], pa.float64()),
                          "tokens": pa.array(tokens[first], pa.int64())})
        with atomic_path(self.folder / f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=self.GROUP_ROWS)


def reference_key(source, cfg: Settings, precision: str = "fp32") -> str:
    """The start model (path, GGUF file, its files' sizes and mtimes), how pairs are tokenized and,
    unless fp32 (so caches of earlier versions still match), the precision of the forward."""
    from cwpo_ray.fingerprints import path_fingerprint

    where = Path(source.path) / source.gguf_file if source.gguf_file else source.path
    extra = () if precision == "fp32" else (precision,)
    return path_fingerprint(where, source.gguf_file, cfg.max_prompt_length, cfg.max_length, cfg.chat_template,
                            *extra)


# ----------------------------------------------------------------------------- Ray Train

def make_job(cfg: Config, mode: str, source, table: Path, save_to: Path, n_pairs: int) -> Job:
    """One phase (SFT or PO): its step plan and learning rate; the model is saved to ``save_to``."""
    epochs, lr = (cfg.sft_epochs, cfg.sft_lr) if mode == "sft" else (cfg.epochs, cfg.lr)
    plan = StepPlan(n_pairs, cfg.batch_size, cfg.num_workers, epochs, cfg.seed, cfg.max_steps, cfg.grad_accumulation)
    warmup = cfg.warmup_steps if cfg.warmup_steps < plan.total_steps else plan.total_steps // 10
    print(f"train-policy {mode}: {n_pairs} pairs, {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), "
          f"global batch {plan.global_batch}, warm-up {warmup}, lr {lr}")
    if cfg.reference_cache:
        cfg = replace(cfg, reference_cache=str(Path(cfg.reference_cache).resolve()))  # workers may have another cwd
    return Job(cfg=cfg, mode=mode, model_path=source.path, gguf_file=source.gguf_file, table=str(table),
               save_to=str(save_to), lr=lr, warmup_steps=warmup, plan=plan,
               metrics_file=str(Path(cfg.out).resolve() / METRICS_FILE),
               reference_table=str(Path(cfg.out).resolve() / "reference.parquet"))


def train_phases(cfg: Config, jobs: list[Job], run_id: str):
    """One Ray Train run of ``train_loop`` through ``jobs`` in order (SFT, then PO).

    One run rather than one per phase: a Ray Train run costs ~15 s to start here (controller, worker
    actors) and each worker ~10 s of imports (bench/RESULTS.md, fixed cost per stage), paid once.
    """
    from cwpo_ray import tracking
    from cwpo_ray.distributed import run_trainer

    out = Path(cfg.out).resolve()
    modes = "-".join(job.mode for job in jobs)
    # Ray Train keys a run's checkpoints by name under the storage path: one name per output folder,
    # so stages sharing a storage_path (the pipeline's arms on s3://) never resume each other's.
    name = modes if not cfg.storage_path else f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}-{modes}"
    with tracking.relay_metrics(jobs[0].metrics_file, run_id):
        result = run_trainer(train_loop, {"jobs": jobs}, cfg, name=name, default_storage=str(out / "ray"))
    error = out / SAVE_ERROR_FILE
    if error.exists():
        raise RuntimeError(f"train-policy: training finished, but saving the model failed (not retried: a retry "
                           f"would train again and fail the same way). The trained state is checkpointed under "
                           f"{cfg.storage_path or out / 'ray'}: rerun the same command once the cause is fixed and "
                           f"it saves without training again. The error:\n{error.read_text()}")
    return result


@dataclass
class StepPlan:
    """Which rows each worker trains on at each step: deterministic, so a resumed run sees the same data."""

    n: int
    batch_size: int
    world: int
    epochs: int
    seed: int
    max_steps: Optional[int] = None
    accumulation: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def rows(self, step: int, rank: int) -> list[list[int]]:
        """This worker's micro-batches of optimizer step ``step``: positions of the epoch's seeded
        permutation of the rows. Up to ``RANDPERM_ROWS`` rows it is ``torch.randperm``'s, the order every
        published run trained in (so they reproduce; at most 512 KiB); above, ``rowstore.permuted``'s,
        computed for these positions only, so memory does not grow with the table."""
        import numpy as np

        from cwpo_ray.rowstore import permuted

        epoch, i = divmod(step, self.steps_per_epoch)
        per_worker = self.batch_size * self.accumulation
        start = i * self.global_batch + rank * per_worker
        if self.n <= RANDPERM_ROWS:
            mine = _randperm(self.n, self.seed * 1000 + epoch)[start:start + per_worker].tolist()
        else:
            mine = permuted(np.arange(start, start + per_worker), self.n, self.seed * 1000 + epoch).tolist()
        return [mine[k:k + self.batch_size] for k in range(0, per_worker, self.batch_size)]


RANDPERM_ROWS = 1 << 16


@functools.lru_cache(maxsize=2)
def _randperm(n: int, seed: int):
    """An epoch's order of ``n`` rows, made once per epoch rather than once per step."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class BatchReader:
    """A micro-batch's columns by row index: the pair table's, joined (PO) with the reference's,
    which has the same rows in the same order; reads only the row groups the rows fall in."""

    def __init__(self, pairs: str, reference: Optional[str] = None):
        from cwpo_ray.rowstore import RowReader

        self.pairs = RowReader(pairs)
        self.reference = RowReader(reference) if reference else None
        if self.reference is not None and self.reference.num_rows != self.pairs.num_rows:
            raise ValueError(f"{reference} has {self.reference.num_rows} rows, {pairs} {self.pairs.num_rows}: "
                             "a reference table of other pairs (rerun with --no-resume)")

    def take(self, rows: list[int]) -> dict:
        batch = self.pairs.take(rows).to_pydict()
        if self.reference is not None:
            ref = self.reference.take(rows).to_pydict()
            if ref.pop("id") != batch["id"]:
                raise ValueError(f"{self.reference.path} does not match {self.pairs.path} row for row "
                                 "(a reference table of other pairs: rerun with --no-resume)")
            batch.update(ref)
        return batch


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: each phase of ``jobs`` in order (SFT, then PO), with checkpoints
    and resume. A restarted worker group skips a phase whose model is saved (the folder appears only
    once complete: ``save_final_model``), and a phase resumes only from its own checkpoints."""
    from cwpo_ray.distributed import barrier

    jobs: list[Job] = loop_config["jobs"]
    for i, job in enumerate(jobs):
        last = i == len(jobs) - 1
        if not last and Path(job.save_to).exists():
            continue
        if not train_phase(job, loop_config["dist"]):
            return  # the save failed: the driver reports it
        if not last:
            barrier()  # rank 0 has saved the model the next phase starts from


def train_phase(job: Job, dist) -> bool:
    """One phase on this worker: load the start, (PO) reference pass, steps with checkpoints, final
    save. False when the final save failed (every worker returns it)."""
    import gc

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from cwpo_ray.distributed import (RankZeroLogger, adamw, device_for, parameters_held, partitioned_init, report,
                                      resume, setup_engine, world)
    from cwpo_ray.models import (ModelSource, enable_gradient_checkpointing, load_causal_lm, load_tokenizer,
                                own_trainable_weights)

    cfg, plan = job.cfg, job.plan
    rank, world_size = world()
    device = device_for(dist)
    source = ModelSource(job.model_path, job.gguf_file)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(source)
    with partitioned_init(dist, plan.batch_size, plan.accumulation):  # ZeRO-3: each worker loads its shard
        model = load_causal_lm(source, attn_implementation=cfg.attn_implementation)
    held, total = parameters_held(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = _with_lora(model, cfg)
    if held == total:  # ZeRO-3's partitions are already where DeepSpeed put them
        model = model.to(device)
        if device.type == "cpu":
            model = own_trainable_weights(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, job.lr, cfg.weight_decay)
    engine = setup_engine(model, optimizer, lambda opt: get_cosine_schedule_with_warmup(
        opt, job.warmup_steps, plan.total_steps), dist, micro_batch_size=plan.batch_size,
        accumulation_steps=plan.accumulation)
    start = (resume(engine, job.mode) or {}).get("step", 0)
    logger = RankZeroLogger(job.metrics_file)
    if start == 0:
        logger.log_metrics({f"{job.mode}/parameters": total, f"{job.mode}/parameters_on_rank0": held}, step=0)
    if job.mode == "po":
        t0 = time.perf_counter()
        ensure_reference(engine, tokenizer, job.table, job.reference(engine.precision), rank, world_size)
        if start == 0:
            logger.log_metrics({"reference/seconds": time.perf_counter() - t0}, step=0)
    batches = BatchReader(job.table, job.reference_table if job.mode == "po" else None)
    prefix = "sft/" if job.mode == "sft" else ""

    engine.train()
    bar = _progress_bar(job, rank, start)
    loop_start = time.perf_counter()
    for step in range(start, plan.total_steps):
        _maybe_fail(job, step, rank, world_size)
        t0 = time.perf_counter()
        metrics = {}
        for micro in plan.rows(step, rank):
            loss, micro_metrics = step_loss(engine, tokenizer, batches.take(micro), job)
            engine.backward_and_step(loss)  # steps the optimizer after the last micro-batch
            for k, v in micro_metrics.items():  # token counts summed, the rest averaged
                metrics[k] = metrics.get(k, 0.0) + (v if k == "tokens" else v / plan.accumulation)
        metrics = _mean_over_workers(metrics, world_size, device)
        seconds = time.perf_counter() - t0
        metrics.update({"pairs_per_s": plan.global_batch / seconds, "tokens_per_s": metrics.pop("tokens") / seconds,
                        "learning_rate": engine.scheduler.get_last_lr()[0], "epoch": (step + 1) / plan.steps_per_epoch})
        logger.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            report({**metrics, "step": step + 1}, engine, {"step": step + 1}, phase=job.mode)
        elif step + 1 == plan.total_steps:
            # No checkpoint at the end: the final model is saved next, and a model + AdamW state
            # written only to be deleted would cost every run a checkpoint's time.
            report({**metrics, "step": step + 1})
    if bar is not None:
        bar.close()
    # Whole-loop time (logging and checkpoints included), what a trainer's "runtime" reports.
    logger.log_metrics({prefix + "loop_seconds": time.perf_counter() - loop_start}, step=plan.total_steps)
    saved = _save_or_keep_state(engine, tokenizer, source, job, rank, device)
    del engine, model, optimizer, params
    gc.collect()  # the next phase loads its own model: this one's memory goes first
    return saved


def _save_or_keep_state(engine, tokenizer, source, job: Job, rank: int, device) -> bool:
    """``save_final_model``; if it fails on any worker, the trained state goes into a checkpoint instead
    (so a rerun saves without training again) and rank 0 leaves the error for the driver. An error
    here is not raised: Ray Train would restart the workers, train the whole phase again and fail the
    same way (a save fails for a reason a retry does not fix: the model, the disk, the code)."""
    import traceback

    from cwpo_ray.distributed import max_over_workers, report

    error = ""
    try:
        save_final_model(engine, tokenizer, source, job, rank)
    except Exception:  # noqa: BLE001 - handed to the driver, which raises it
        error = traceback.format_exc()
    if not max_over_workers([1.0 if error else 0.0], device)[0]:
        return True
    steps = job.plan.total_steps
    report({"step": steps, "save_failed": 1.0}, engine, {"step": steps}, phase=job.mode)
    if rank == 0 or error:
        Path(job.save_to).parent.joinpath(SAVE_ERROR_FILE).write_text(error or "failed on another worker\n")
    return False


def step_loss(engine, tokenizer, batch: dict, job: Job):
    """The loss of one worker's micro-batch (its columns, ``BatchReader.take``) and its metrics
    (token count as 'tokens', summed later)."""
    from cwpo_ray import logprobs

    lengths = job.lengths
    if job.mode == "sft":
        tokens = logprobs.sft_batch(tokenizer, batch["prompt"], batch["chosen"], lengths)
        loss, count = logprobs.sft_loss(engine, tokens)
        return loss, {"loss": float(loss.detach()), "tokens": float(count)}
    tokens = logprobs.pair_batch(tokenizer, batch["prompt"], batch["chosen"], batch["rejected"], lengths,
                                 packing=job.cfg.resolved_packing())
    return logprobs.po_loss(engine, tokens, batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["weight"],
                            loss_type=job.cfg.loss, beta=job.cfg.beta, epsilon=job.cfg.epsilon)


def _mean_over_workers(metrics: dict, world_size: int, device) -> dict:
    """Every worker's metrics averaged (token counts summed): what rank 0 logs is the global batch's."""
    from cwpo_ray.distributed import sum_over_workers

    keys = sorted(metrics)
    sums = sum_over_workers([metrics[k] for k in keys], device)
    return {k: v if k == "tokens" else v / world_size for k, v in zip(keys, sums)}


def save_final_model(engine, tokenizer, source, job: Job, rank: int) -> None:
    """save_pretrained (+ tokenizer) from rank 0, LoRA merged, fp32, published atomically.

    Rank 0 holds the whole trained model (DDP, ZeRO 0-2): it is saved as it is, LoRA merged into
    it in place (training is over), without loading the start model again. Under ZeRO-3 the
    module's weights are shards, so the gathered weights go into a fresh copy of the start model.
    """
    from cwpo_ray.tables import atomic_path

    if getattr(engine, "zero_stage", None) == 3:
        state = engine.full_state_dict()  # collective: every rank calls it
        if rank != 0:
            return
        model = _fresh_copy_with(state, source, job.cfg)
    else:
        if rank != 0:
            return
        model = engine.module.float()  # bf16 under DeepSpeed's mixed precision; saved in fp32, as the start model
    if job.cfg.lora:
        model = model.merge_and_unload()
    with atomic_path(job.save_to) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _fresh_copy_with(state: dict, source, cfg: Settings):
    """The start model (LoRA-wrapped as in training) with ``state``'s weights."""
    from cwpo_ray.models import load_causal_lm

    model = _with_lora(load_causal_lm(source), cfg)
    missing, unexpected = model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) | {"lm_head.weight"}
    if unexpected or any(not any(k.endswith(t) for t in tied) for k in missing):
        raise RuntimeError(f"final weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _with_lora(model, cfg: Settings):
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or None
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def _progress_bar(job: Job, rank: int, start: int):
    if rank != 0 or not job.cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=job.plan.total_steps, initial=start, desc=job.mode, unit="step", mininterval=1.0)


def _maybe_fail(job: Job, step: int, rank: int, world_size: int) -> None:
    """Testing hook: the last worker's process dies once at PO step ``fail_at_step``."""
    from cwpo_ray.distributed import die_once

    if job.mode == "po" and step == job.cfg.fail_at_step and rank == world_size - 1:
        die_once(Path(job.save_to).parent / f".failed-at-{step}")


def _existing_run(run_id_file: Path, uri: str) -> Optional[str]:
    """The run id saved by an earlier attempt, if that run exists on the current tracking server."""
    if not run_id_file.exists():
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = run_id_file.read_text().strip()
    try:
        MlflowClient(uri).get_run(run_id)
        return run_id
    except MlflowException:
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()

