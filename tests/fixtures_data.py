"""Writers of small fixture files in each upstream preference format (for tests/test_data.py)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def write_jsonl(path: Path, rows: Iterable, raw_lines: Iterable[str] = ()) -> Path:
    """Rows as JSON lines (``raw_lines`` appended verbatim: broken lines for quarantine tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "".join(l + "\n" for l in raw_lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# ----------------------------------------------------------------------------- HH-RLHF

def hh_transcript(turns: list[tuple[str, str]], final: str) -> str:
    """``turns``: earlier (human, assistant) exchanges; the last human turn is ``turns[-1][0]``
    when its assistant text is None; ``final`` is the last assistant reply."""
    text = ""
    for human, assistant in turns:
        text += f"\n\nHuman: {human}\n\nAssistant:"
        if assistant is not None:
            text += f" {assistant}"
    return text + final


def hh_row(turns: list[tuple[str, str | None]], chosen: str, rejected: str) -> dict:
    return {"chosen": hh_transcript(turns, chosen), "rejected": hh_transcript(turns, rejected)}


# ----------------------------------------------------------------------------- TL;DR

def tldr_row(subreddit: str | None, title: str | None, post: str | None, texts: list, choice,
             article: str | None = None) -> dict:
    info = {"id": "t3_abc", "subreddit": subreddit, "title": title, "post": post}
    if article is not None:
        info.update(article=article, site="cnn", subreddit=None)
    return {"info": info, "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
            "choice": choice, "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 7}}


# ----------------------------------------------------------------------------- UltraFeedback-binarized

def uf_row(prompt: str, chosen: str | None, rejected: str | None, prompt_id: str | None = None,
           history: list[dict] | None = None) -> dict:
    def msgs(reply):
        out = [{"role": "user", "content": prompt}] + list(history or [])
        if reply is not None:
            out.append({"role": "assistant", "content": reply})
        return out

    return {"prompt": prompt, "prompt_id": prompt_id, "chosen": msgs(chosen), "rejected": msgs(rejected),
            "messages": msgs(chosen), "score_chosen": 8.0, "score_rejected": 4.0}


# ----------------------------------------------------------------------------- synthetic volume

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum about "
         "preference data confidence weighting and small annotators").split()


def synthetic_pairs(n: int, seed: int = 0, prompt_words: int = 12, response_words: int = 8) -> list[dict]:
    """``n`` distinct labeled pairs in our own column format (no ids: ids are derived)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"q{i}: " + " ".join(rng.choices(WORDS, k=prompt_words))
        a = " ".join(rng.choices(WORDS, k=response_words))
        b = " ".join(rng.choices(WORDS, k=response_words)) + f" ({i})"
        rows.append({"prompt": prompt, "chosen": a, "rejected": b})
    return rows


def write_hh_volume(path: Path, n: int, row_bytes: int = 1000) -> int:
    """``n`` distinct HH rows of about ``row_bytes`` bytes each; returns the file size."""
    filler = (" ".join(WORDS) + " ") * (row_bytes // 100 + 1)
    prompt_len = max(row_bytes - 300, 50)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            human = f"{i} " + filler[:prompt_len]
            row = {"chosen": f"\n\nHuman: {human}\n\nAssistant: yes {i} " + filler[:100],
                   "rejected": f"\n\nHuman: {human}\n\nAssistant: no {i} " + filler[100:200]}
            fh.write(json.dumps(row) + "\n")
    return path.stat().st_size
