"""Normalize a preference source into labeled / unlabeled / test pair tables.

SOURCE is KIND:WHERE. KIND is the upstream format: hh-rlhf (Anthropic HH-RLHF transcripts),
tldr (OpenAI summarize_from_feedback comparisons), ultrafeedback (UltraFeedback-binarized
message lists) or pairs (our columns: id?, prompt, chosen, rejected -- or id?, prompt,
response_a, response_b, human_choice?). WHERE is a local .parquet / .jsonl(.gz) file or a
folder of them, or a hub dataset id (read with `datasets`, streaming).

In a local folder, files whose path contains "test" (for tldr also "valid") are the test split,
the rest is train; a Parquet file of prompts alone (a prompt column, no response columns: the
built-in benchmark's test_unseen.parquet) is an evaluation table, not pairs, and is skipped (the
manifest lists it). On the hub: Anthropic/hh-rlhf train/test, openai/summarize_from_feedback
(config comparisons) train/validation, HuggingFaceH4/ultrafeedback_binarized train_prefs/test_prefs.

First, about validation_fraction of the train *prompts* (a seeded hash of the prompt text, so a
prompt with several pairs is held out whole) form the validation split: for choosing a model
(checkpoints, settings), so that the test split is only ever reported on. A train prompt that is
also a test prompt is never a validation prompt, so validation, test and labeled + unlabeled
share no prompt. A validation row has the test table's columns: id, prompt, chosen, rejected
(by the gold scores when the source has them, as in the built-in benchmark's test table, else by
the human label; empty for a pair without either) and gold_chosen, gold_rejected (empty without
gold). Every other train pair goes to labeled or unlabeled by a seeded hash of its id (about
labeled_fraction labeled); unlabeled pairs show the two responses in a seeded random order,
the human's choice kept aside in human_choice. Bad rows and duplicates (same prompt and same
two responses; the test split is read first, so a test pair is never also a train pair) go to
quarantine.parquet with a reason. Writes OUT/labeled.parquet, OUT/unlabeled.parquet,
OUT/validation.parquet (unless validation_fraction is 0), OUT/test.parquet (when there is a test
split), OUT/quarantine.parquet and OUT/manifest.json, each atomically; a rerun replaces them.
Memory stays flat however large the source.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from cwpo_ray.config import option, to_dict
from cwpo_ray.out_lock import hold_out
from cwpo_ray.source_reading import limit_rows, local_files, locate, open_source, parse_source, progress_bar
from cwpo_ray.sources import (NORMALIZERS, Pair, Unjudged, a_is_chosen, gold_of, id_key, is_validation, pair_id,
                              prompt_key, quarantine_id, raw_json, split_of)
from cwpo_ray.tables import LABELED_SCHEMA, QUARANTINE_SCHEMA, UNLABELED_SCHEMA, ParquetSink, atomic_path

EPILOG = """examples:
  cwpo data --source hh-rlhf:Anthropic/hh-rlhf --out runs/data/hh
  cwpo data --source pairs:my_pairs.parquet --out runs/data/mine --labeled-fraction 0.2 --seed 1
  cwpo data --source tldr:downloads/comparisons/ --out runs/data/tldr max_rows=20000
  cwpo data --source pairs:cwpo_ray/benchmark_data --out runs/data/bench --validation-fraction 0.2
"""

TABLES = ("labeled", "unlabeled", "validation", "test", "quarantine")
# The test table's columns, and the gold scores of its two responses when the source has them.
VALIDATION_SCHEMA = pa.schema([(c, pa.string()) for c in ("id", "prompt", "chosen", "rejected")]
                              + [("gold_chosen", pa.float64()), ("gold_rejected", pa.float64())])


@dataclass
class Settings:
    """How a source is normalized and split: everything but the source, the output and the seed.
    The pipeline's ``data`` section is this class."""

    labeled_fraction: float = option(0.3, "fraction of train pairs that keep their human label, in (0, 1)")
    validation_fraction: float = option(0.1, "fraction of train prompts held out as the validation split (for "
                                             "choosing a model; no prompt shared with labeled, unlabeled or "
                                             "test), in [0, 1); 0: no validation split")
    max_rows: Optional[int] = option(None, "read at most this many rows of each split (train, test)")
    train_split: str = option("", "hub split read as train (empty: the source's usual name)")
    test_split: str = option("", "hub split read as test ('none': no test table; empty: the source's usual name)")
    hub_config: str = option("", "hub dataset config name (empty: 'comparisons' for tldr, none otherwise)")
    tldr_articles: bool = option(False, "keep TL;DR news-article (CNN/DM) rows instead of quarantining them")
    batch_size: int = option(4096, "rows per read and write batch (bounds memory)")

    def validate(self) -> None:
        if not 0.0 < self.labeled_fraction < 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1), got {self.labeled_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(kw_only=True)
class Config(Settings):
    source: str = option(help="KIND:WHERE; KIND one of hh-rlhf, tldr, ultrafeedback, pairs; WHERE a local "
                              "file/folder in that format or a hub dataset id")
    out: str = option(help="output folder for labeled/unlabeled/validation/test/quarantine.parquet and manifest.json")
    seed: int = option(0, "seed of the validation and labeled/unlabeled splits and of the response order of "
                          "unlabeled pairs")
    progress: bool = option(True, "progress bar on stderr (shown only when stderr is a terminal)")

    def validate(self) -> None:
        super().validate()
        kind, where = parse_source(self.source)
        if not self.out.strip():
            raise ValueError("out: an output folder is required")
        locate(where)


# ----------------------------------------------------------------------------- the stage

class DataStage:
    """Routes each normalized row to its table; owns the dedup keys and the counts."""

    def __init__(self, cfg: Config, kind: str, sinks: dict[str, ParquetSink]):
        self.cfg, self.sinks = cfg, sinks
        self.normalize = NORMALIZERS[kind]
        self.kwargs = {"articles": cfg.tldr_articles} if kind == "tldr" else {}
        self.seen_content: set[int] = set()  # 64-bit keys: the state that grows with the input
        self.seen_ids: set[int] = set()      # only for source ids (derived ids are content keys)
        self.test_prompts: set[int] = set()  # 64-bit prompt keys: a test prompt is never a validation prompt
        self.counts: Counter = Counter()
        self.reasons: Counter = Counter()

    def quarantine(self, row: Any, reason: str, id: Optional[str] = None) -> None:
        raw = raw_json(row)
        self.sinks["quarantine"].write({"id": id if id is not None else quarantine_id(row, raw),
                                        "reason": reason, "raw": raw})
        self.counts["quarantined"] += 1
        self.reasons[reason] += 1

    def add(self, row: Any, split: str) -> None:
        self.counts["read"] += 1
        self.counts[f"read_{split}"] += 1
        result = self.normalize(row, **self.kwargs)
        if isinstance(result, str):
            self.quarantine(row, result)
            return
        r1, r2 = (result.chosen, result.rejected) if isinstance(result, Pair) else (result.response_a, result.response_b)
        derived = pair_id(result.prompt, r1, r2)
        key = int(derived, 16)
        if key in self.seen_content:
            self.quarantine(row, "duplicate", result.id)
            return
        if result.id != derived:  # a source id: two different pairs must not share it
            ik = id_key(result.id)
            if ik in self.seen_ids:
                self.quarantine(row, "duplicate id", result.id)
                return
            self.seen_ids.add(ik)
        self.seen_content.add(key)

        if split == "test":
            if isinstance(result, Unjudged):
                self.quarantine(row, "no human choice (test split)", result.id)
                return
            self.test_prompts.add(prompt_key(result.prompt))
            self._write("test", result._asdict())
        elif self.cfg.validation_fraction > 0 and is_validation(result.prompt, self.cfg.seed,
                                                                self.cfg.validation_fraction):
            if self.test_prompts and prompt_key(result.prompt) in self.test_prompts:
                self.counts["validation_prompt_in_test"] += 1  # stays a train pair, like any other
                self._train(result)
            else:
                self._write("validation", validation_row(result, gold_of(row, result)))
        else:
            self._train(result)

    def _train(self, result) -> None:
        if isinstance(result, Unjudged):
            self._write("unlabeled", {**result._asdict(), "human_choice": None})
        elif split_of(result.id, self.cfg.seed, self.cfg.labeled_fraction) == "labeled":
            self._write("labeled", result._asdict())
        else:
            a_first = a_is_chosen(result.id, self.cfg.seed)
            a, b = (result.chosen, result.rejected) if a_first else (result.rejected, result.chosen)
            self._write("unlabeled", {"id": result.id, "prompt": result.prompt, "response_a": a, "response_b": b,
                                      "human_choice": "a" if a_first else "b"})

    def _write(self, table: str, row: dict) -> None:
        self.sinks[table].write(row)
        self.counts[table] += 1


def validation_row(result: "Pair | Unjudged", gold: Optional[tuple[float, float]]) -> dict:
    """A held-out train pair as a test-table row: chosen / rejected by the gold scores when the source
    has them (the built-in benchmark's test table is ordered so; a tie keeps the human's order), else by
    the human label; both empty for a pair with neither (prompts are all `cwpo evaluate` needs)."""
    if isinstance(result, Pair):
        c, r = result.chosen, result.rejected
        gc, gr = gold if gold is not None else (None, None)
        if gold is not None and gr > gc:
            c, r, gc, gr = r, c, gr, gc
    elif gold is not None:
        a_wins = gold[0] >= gold[1]
        c, r = (result.response_a, result.response_b) if a_wins else (result.response_b, result.response_a)
        gc, gr = max(gold), min(gold)
    else:
        c = r = gc = gr = None
    return {"id": result.id, "prompt": result.prompt, "chosen": c, "rejected": r, "gold_chosen": gc,
            "gold_rejected": gr}


def _tables(has_test: bool, has_validation: bool) -> list[str]:
    return [t for t in TABLES if (t != "test" or has_test) and (t != "validation" or has_validation)]


def _report(stage: DataStage, out: Path, tables: list[str], skipped: list[Path]) -> None:
    c, w = stage.counts, 12
    kept = c["labeled"] + c["unlabeled"] + c["validation"] + c["test"]
    read_parts = f"train {c['read_train']}" + (f", test {c['read_test']}" if "test" in tables else "")
    lines = [f"cwpo data: read {c['read']} rows ({read_parts})"]
    lines += [f"  skipped {f} (prompts only, no pairs)" for f in skipped]
    for table in tables:
        n = c["quarantined" if table == "quarantine" else table]
        lines.append(f"  {table:<{w}}{n:>9}  -> {out / (table + '.parquet')}")
    for reason, n in sorted(stage.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {n:>9}  {reason}")
    lines.append(f"  read {c['read']} = kept {kept} + quarantined {c['quarantined']} "
                 f"(of which duplicates {stage.reasons['duplicate'] + stage.reasons['duplicate id']})")
    if c["validation_prompt_in_test"]:
        lines.append(f"  {c['validation_prompt_in_test']} train pairs whose prompt is also a test prompt stayed out "
                     "of validation")
    print("\n".join(lines), flush=True)


def run(cfg: Config) -> int:
    kind, splits = open_source(cfg)  # a source that cannot be read is refused before OUT is made
    # One run per OUT: two data runs into one folder would mix their tables (cwpo_ray/out_lock.py).
    with hold_out(cfg.out, "data"):
        return _split_into_tables(cfg, kind, splits)


def _split_into_tables(cfg: Config, kind: str, splits: list) -> int:
    place, target = locate(parse_source(cfg.source)[1])
    skipped = local_files(target)[1] if place == "local" else []  # named in the report and the manifest
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    has_test = any(s.name == "test" for s in splits)
    has_validation = cfg.validation_fraction > 0
    tables = _tables(has_test, has_validation)
    schemas = {"labeled": LABELED_SCHEMA, "unlabeled": UNLABELED_SCHEMA, "validation": VALIDATION_SCHEMA,
               "test": LABELED_SCHEMA, "quarantine": QUARANTINE_SCHEMA}
    with contextlib.ExitStack() as stack:
        sinks = {t: stack.enter_context(ParquetSink(out / f"{t}.parquet", schemas[t], buffer_rows=cfg.batch_size))
                 for t in tables}
        stage = DataStage(cfg, kind, sinks)
        known = [s.total for s in splits]
        total = None if None in known else sum(min(t, cfg.max_rows or t) for t in known)
        with progress_bar(total, cfg.progress) as bar:
            for split in splits:
                for row in limit_rows(split.rows, cfg.max_rows):
                    stage.add(row, split.name)
                    if bar is not None:
                        bar.update(1)
    # All tables are published (each atomically); now drop a stale test / validation table and write the manifest.
    for t in ("test", "validation"):
        if t not in tables:
            with contextlib.suppress(FileNotFoundError):
                (out / f"{t}.parquet").unlink()
    c = stage.counts
    kept = c["labeled"] + c["unlabeled"] + c["validation"] + c["test"]
    if c["read"] != kept + c["quarantined"]:  # every row read lands in exactly one table
        raise RuntimeError(f"internal error: read {c['read']} != kept {kept} + quarantined {c['quarantined']}")
    manifest = {
        "stage": "data",
        "source": cfg.source,
        "kind": kind,
        "splits": {s.name: s.origin for s in splits},
        "skipped_files": [str(f) for f in skipped],
        "config": to_dict(cfg),
        "counts": {
            "read": c["read"], "read_train": c["read_train"], "read_test": c["read_test"],
            "kept": kept, "labeled": c["labeled"], "unlabeled": c["unlabeled"],
            "validation": c["validation"] if has_validation else None,
            "test": c["test"] if has_test else None, "quarantined": c["quarantined"],
            "duplicates": stage.reasons["duplicate"] + stage.reasons["duplicate id"],
            "quarantine_reasons": dict(sorted(stage.reasons.items())),
            "validation_prompt_in_test": c["validation_prompt_in_test"],
        },
        "tables": {t: f"{t}.parquet" for t in tables},
        "columns": {t: schemas[t].names for t in tables},
    }
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _report(stage, out, tables, skipped)
    return 0
