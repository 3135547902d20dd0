"""Input rows of `cwpo annotate`: checked (bad rows get a quarantine reason, never an error) and
labeled by the annotator in batches; no Ray, no files."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from cwpo_ray.sources import pair_id, quarantine_id, raw_json
from cwpo_ray.tables import ANNOTATED_SCHEMA, HUMAN_CHOICE

TEXT_FIELDS = ("prompt", "response_a", "response_b")
# What labeling a batch gives: the annotated columns plus what is needed to split, report
# and export (dropped before anything is written); the folds' disagreement only under confidence ensemble.
BATCH_SCHEMA = pa.schema(list(ANNOTATED_SCHEMA) + [
    ("reason", pa.string()), ("raw", pa.string()), ("preferred", pa.string()), (HUMAN_CHOICE, pa.string()),
    ("fold_disagreement", pa.float64()), ("fold_margin_std", pa.float64())])
ENSEMBLE_FIELDS = ("fold_disagreement", "fold_margin_std")


def check_pair(row: Any) -> tuple[str, str, str, str, str | None] | str:
    """``(id, prompt, response_a, response_b, human_choice)`` of a good row, else the reason it is bad.
    The field and id checks are `cwpo data`'s own (sources.py), so both stages refuse the same rows."""
    from cwpo_ray.sources import BadRow, source_id, text_field

    if isinstance(row, InvalidJSON):
        return "invalid JSON"
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    try:
        prompt, a, b = (text_field(row, name) for name in TEXT_FIELDS)
        rid = source_id(row)
    except BadRow as e:
        return str(e)
    if a == b:
        return "identical responses"
    choice = row.get(HUMAN_CHOICE)
    choice = choice.strip().lower() if isinstance(choice, str) else None
    return rid or pair_id(prompt, a, b), prompt, a, b, choice if choice in ("a", "b") else None


class InvalidJSON(str):
    """A JSONL line that does not parse (kept verbatim for the quarantine)."""


def parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return InvalidJSON(line)


def label_rows(annotator, name: str, rows: list, model_batch_size: int) -> pa.Table:
    """One batch of input rows (dicts, or InvalidJSON lines) as a BATCH_SCHEMA table, in input order."""
    checked = [check_pair(r) for r in rows]
    good = [i for i, c in enumerate(checked) if not isinstance(c, str)]
    labels = annotator.label_pairs([checked[i][1] for i in good], [checked[i][2] for i in good],
                                   [checked[i][3] for i in good], batch_size=model_batch_size) if good else {}
    out = {col: [None] * len(rows) for col in BATCH_SCHEMA.names}
    for j, i in enumerate(good):
        rid, prompt, a, b, human = checked[i]
        first = labels["preferred"][j] == "a"
        ra, rb = labels["reward_a"][j], labels["reward_b"][j]
        values = dict(id=rid, prompt=prompt, chosen=a if first else b, rejected=b if first else a,
                      reward_chosen=ra if first else rb, reward_rejected=rb if first else ra,
                      confidence=labels["confidence"][j], confidence_raw=labels["confidence_raw"][j], annotator=name,
                      preferred=labels["preferred"][j], **{HUMAN_CHOICE: human},
                      **{k: labels[k][j] for k in ENSEMBLE_FIELDS if k in labels})
        for k, v in values.items():
            out[k][i] = v
    for i, c in enumerate(checked):
        if isinstance(c, str):
            row = rows[i]
            raw = raw_json({"__invalid_json__": str(row)}) if isinstance(row, InvalidJSON) else raw_json(row)
            out["id"][i] = quarantine_id(row, raw)
            out["reason"][i], out["raw"][i] = c, raw
    return pa.Table.from_pydict(out, schema=BATCH_SCHEMA)
