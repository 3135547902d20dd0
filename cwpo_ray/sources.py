"""Turn one raw upstream preference row into a normalized pair, or a reason to quarantine it.

Pure functions: no Ray, no I/O, never raise on bad input. Each ``normalize_*`` takes one row
(a dict as read from JSONL/Parquet/the hub) and returns one of

- ``Pair(id, prompt, chosen, rejected)``: a pair with a known human preference;
- ``Unjudged(id, prompt, response_a, response_b)``: a pair without one (only the ``pairs``
  source can produce it, from unlabeled rows with no ``human_choice``);
- ``str``: the reason the row is quarantined.

Ids: the source's own id when it has one per pair (stringified), else ``pair_id``: a hash of the
prompt and the *sorted* two responses, so the same pair has one id whichever response won.
The labeled/unlabeled split and the position of the human's choice are seeded hashes of the id
(``split_of``, ``a_is_chosen``): the same on every machine and process, in any input order.
The validation split is a seeded hash of the *prompt* (``is_validation``): a source with several
pairs per prompt (HH-RLHF) has each prompt wholly in validation or wholly out of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable, Mapping, NamedTuple, Union

INVALID_JSON_KEY = "__invalid_json__"  # how tables.iter_rows yields a JSONL line that is not an object
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
RAW_MAX_CHARS = 4000


class Pair(NamedTuple):
    id: str
    prompt: str
    chosen: str
    rejected: str


class Unjudged(NamedTuple):
    id: str
    prompt: str
    response_a: str
    response_b: str


Result = Union[Pair, Unjudged, str]


# ----------------------------------------------------------------------------- ids and hashes

def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def pair_id(prompt: str, response_1: str, response_2: str) -> str:
    """Content id of a pair: 16 hex chars of sha1(prompt NUL min(r1, r2) NUL max(r1, r2))."""
    lo, hi = sorted((response_1, response_2))
    return hashlib.sha1(_utf8(prompt) + b"\x00" + _utf8(lo) + b"\x00" + _utf8(hi)).hexdigest()[:16]


def content_key(prompt: str, response_1: str, response_2: str) -> int:
    """A compact (64-bit) dedup key: same prompt + same set of responses -> same key."""
    return int(pair_id(prompt, response_1, response_2), 16)


def id_key(pair_id_: str) -> int:
    """A compact (64-bit) key of an id, for detecting a source id used by two different pairs."""
    return int.from_bytes(hashlib.blake2b(_utf8(pair_id_), digest_size=8).digest(), "big")


def hash_unit(text: str) -> float:
    """A uniform float in [0, 1) from a string (blake2b, identical on every platform)."""
    return int.from_bytes(hashlib.blake2b(_utf8(text), digest_size=8).digest(), "big") / 2.0 ** 64


def split_of(id: str, seed: int, labeled_fraction: float) -> str:
    """``"labeled"`` or ``"unlabeled"``: a seeded hash of the id (no shuffle, no global state).

    Raising ``labeled_fraction`` only ever moves pairs from unlabeled to labeled.
    """
    return "labeled" if hash_unit(f"{seed}:split:{id}") < labeled_fraction else "unlabeled"


def prompt_key(prompt: str) -> int:
    """A compact (64-bit) key of a prompt, for telling whether a train prompt is also a test prompt."""
    return int.from_bytes(hashlib.blake2b(b"prompt\x00" + _utf8(prompt), digest_size=8).digest(), "big")


def is_validation(prompt: str, seed: int, validation_fraction: float) -> bool:
    """Whether a train prompt is held out for validation: a seeded hash of the prompt text (blake2b,
    not Python's salted ``hash``, so every machine and process agrees), independent of ``split_of``.
    Keyed on the prompt, not the pair id, so no prompt is both validated on and trained on.
    Raising ``validation_fraction`` only ever moves prompts into validation."""
    return hash_unit(f"{seed}:validation:{prompt}") < validation_fraction


def gold_of(row: Mapping[str, Any], result: "Pair | Unjudged") -> tuple[float, float] | None:
    """The gold scores of a normalized pair's two responses when the raw row carries them (the built-in
    benchmark's ``gold_a`` / ``gold_b``, or ``gold_chosen`` / ``gold_rejected``), in the order of
    ``result`` (chosen, rejected / response_a, response_b); None when absent or not numbers."""
    def num(key):
        v = row.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None

    if isinstance(result, Pair) and num("gold_chosen") is not None and num("gold_rejected") is not None:
        return num("gold_chosen"), num("gold_rejected")
    ga, gb = num("gold_a"), num("gold_b")
    if ga is None or gb is None or row.get("response_a") is None:  # gold_a names response_a's score
        return None
    if isinstance(result, Unjudged):
        return ga, gb
    a_first = row.get("response_a") == result.chosen
    return (ga, gb) if a_first else (gb, ga)


def a_is_chosen(id: str, seed: int) -> bool:
    """Whether ``response_a`` of an unlabeled pair is the human's choice (a seeded coin, independent
    of ``split_of``), so the position of a response reveals nothing."""
    return hash_unit(f"{seed}:position:{id}") < 0.5


# ----------------------------------------------------------------------------- field helpers

class BadRow(Exception):
    """A field check failed; carries the quarantine reason (`cwpo data` and `cwpo annotate` alike)."""


def text_field(row: Mapping, key: str, name: str | None = None, *, allow_blank: bool = False) -> str:
    name = name or key
    if key not in row or row[key] is None:
        raise BadRow(f"missing field: {name}")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"not a string: {name} ({type(value).__name__})")
    if not allow_blank and not value.strip():
        raise BadRow(f"empty field: {name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"invalid unicode: {name}") from None
    return value


def source_id(row: Mapping, key: str = "id") -> str | None:
    """The row's own id, stringified; None when absent or blank (the id is then derived)."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow(f"bad id: {key} is a bool")
    if isinstance(value, float):
        if value != value:  # NaN: a missing id from a pandas-written file
            return None
        if not value.is_integer():
            raise BadRow(f"bad id: {key} is a non-integer number")
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise BadRow(f"bad id: {key} is a {type(value).__name__}")
    value = value.strip()
    if not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"invalid unicode: {key}") from None
    return value


def _finish(sid: str | None, prompt: str, chosen: str, rejected: str) -> Result:
    if not prompt.strip():
        return "empty field: prompt"
    if not chosen.strip():
        return "empty field: chosen"
    if not rejected.strip():
        return "empty field: rejected"
    if chosen == rejected:
        return "identical responses"
    return Pair(sid or pair_id(prompt, chosen, rejected), prompt, chosen, rejected)


def _guard(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Never raise on bad input: field-check failures and anything unforeseen become reasons."""

    @functools.wraps(fn)
    def wrapper(row, *args, **kwargs) -> Result:
        if not isinstance(row, Mapping):
            return f"not a JSON object ({type(row).__name__})"
        if INVALID_JSON_KEY in row:
            return "invalid JSON"
        try:
            return fn(row, *args, **kwargs)
        except BadRow as e:
            return str(e)
        except Exception as e:  # a shape nobody anticipated: quarantine it, do not crash a long run
            return f"malformed row ({type(e).__name__})"

    return wrapper


# ----------------------------------------------------------------------------- the sources

def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """(prompt, chosen response, rejected response) of two HH transcripts, or a reason.

    The prompt is the shared prefix up to and including the last ``"\\n\\nAssistant:"`` turn
    marker that both transcripts have at the same place; earlier turns stay in the prompt.
    The bare word "Assistant:" inside a reply is not a marker.
    """
    shared = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)
    if cut < 0:
        return "no separable prompt"
    end = cut + len(HH_ASSISTANT)
    a, b = chosen[end:], rejected[end:]
    if HH_HUMAN in a or HH_HUMAN in b:
        # The transcripts differ before their final assistant turn: no single shared prompt.
        return "no separable prompt (transcripts differ before the last turn)"
    return chosen[:end], a.lstrip(), b.lstrip()


@_guard
def normalize_hh(row: Mapping[str, Any]) -> Result:
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` full transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    chosen = text_field(row, "chosen")
    rejected = text_field(row, "rejected")
    sid = source_id(row)
    if chosen == rejected:
        return "identical responses"
    parts = split_hh(chosen, rejected)
    if isinstance(parts, str):
        return parts
    return _finish(sid, *parts)


@_guard
def normalize_tldr(row: Mapping[str, Any], articles: bool = False) -> Result:
    """OpenAI summarize_from_feedback ``comparisons``: ``info`` (subreddit, title, post),
    ``summaries`` (two dicts with ``text``) and ``choice`` (0 or 1, the index of the preferred one).

    Prompt: ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``. Rows of news
    articles (CNN/DM: ``article`` instead of ``post``) are quarantined unless ``articles`` is true,
    then their prompt is ``"TITLE: {title}\\nARTICLE: {article}\\nTL;DR:"`` (title line only if any).
    The source's ``info.id`` names the post, not the pair (one post has many comparisons), so the
    id is derived from the content.
    """
    info = row.get("info")
    if info is None:
        return "missing field: info"
    if not isinstance(info, Mapping):
        return f"not a mapping: info ({type(info).__name__})"
    post = info.get("post")
    if post is None and info.get("article") is not None:
        if not articles:
            return "news article, not a reddit post (tldr_articles=false)"
        article = text_field(info, "article", "info.article").strip()
        title = info.get("title")
        title_line = ""
        if title is not None:
            title_line = f"TITLE: {text_field(info, 'title', 'info.title', allow_blank=True).strip()}\n"
        prompt = f"{title_line}ARTICLE: {article}\nTL;DR:"
    else:
        subreddit = text_field(info, "subreddit", "info.subreddit").strip()
        title = text_field(info, "title", "info.title", allow_blank=True).strip()
        post = text_field(info, "post", "info.post").strip()
        prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
    summaries = row.get("summaries")
    if summaries is None:
        return "missing field: summaries"
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        return "summaries must be a list of 2"
    if not all(isinstance(s, Mapping) for s in summaries):
        return "summaries must be a list of 2"
    texts = [text_field(s, "text", f"summaries[{i}].text").strip() for i, s in enumerate(summaries)]
    choice = row.get("choice")
    if choice is None:
        return "missing field: choice"
    if isinstance(choice, bool) or not isinstance(choice, int):
        if isinstance(choice, float) and choice in (0.0, 1.0):
            choice = int(choice)
        else:
            return f"choice out of range: {choice!r}"
    if choice not in (0, 1):
        return f"choice out of range: {choice!r}"
    return _finish(None, prompt, texts[choice], texts[1 - choice])


def _last_assistant(messages: Any, name: str) -> str:
    if isinstance(messages, str):  # some mirrors store the response itself
        if not messages.strip():
            raise BadRow(f"empty field: {name}")
        return text_field({name: messages}, name)
    if not isinstance(messages, (list, tuple)):
        raise BadRow(f"not a message list: {name} ({type(messages).__name__})")
    for m in reversed(messages):
        if isinstance(m, Mapping) and m.get("role") == "assistant":
            return text_field(m, "content", f"{name} (last assistant message)")
    raise BadRow(f"no assistant message: {name}")


@_guard
def normalize_ultrafeedback(row: Mapping[str, Any]) -> Result:
    """UltraFeedback-binarized: ``prompt`` string; ``chosen`` / ``rejected`` message lists
    ``[{role, content}, ...]`` whose last assistant message is the response. Id: ``prompt_id``."""
    prompt = text_field(row, "prompt")
    if "chosen" not in row or row["chosen"] is None:
        return "missing field: chosen"
    if "rejected" not in row or row["rejected"] is None:
        return "missing field: rejected"
    chosen = _last_assistant(row["chosen"], "chosen")
    rejected = _last_assistant(row["rejected"], "rejected")
    sid = source_id(row, "prompt_id") if row.get("prompt_id") is not None else source_id(row)
    return _finish(sid, prompt, chosen, rejected)


@_guard
def normalize_pairs(row: Mapping[str, Any]) -> Result:
    """Our own columns: labeled ``id?, prompt, chosen, rejected`` or unlabeled
    ``id?, prompt, response_a, response_b`` with an optional ``human_choice`` ("a" or "b")."""
    prompt = text_field(row, "prompt")
    sid = source_id(row)
    if row.get("chosen") is not None or row.get("rejected") is not None:
        return _finish(sid, prompt, text_field(row, "chosen"), text_field(row, "rejected"))
    if row.get("response_a") is None and row.get("response_b") is None:
        return "missing field: chosen/rejected or response_a/response_b"
    a = text_field(row, "response_a")
    b = text_field(row, "response_b")
    choice = row.get("human_choice")
    if isinstance(choice, str):
        choice = choice.strip().lower() or None
    if choice is None:
        if a == b:
            return "identical responses"
        return Unjudged(sid or pair_id(prompt, a, b), prompt, a, b)
    if choice not in ("a", "b"):
        return f"bad human_choice: {row.get('human_choice')!r} (expected 'a' or 'b')"
    return _finish(sid, prompt, a, b) if choice == "a" else _finish(sid, prompt, b, a)


NORMALIZERS: dict[str, Callable[..., Result]] = {
    "hh-rlhf": normalize_hh,
    "tldr": normalize_tldr,
    "ultrafeedback": normalize_ultrafeedback,
    "pairs": normalize_pairs,
}


# ----------------------------------------------------------------------------- quarantine helpers

def _clean(s: str) -> str:
    """A string Parquet can store (lone surrogates replaced)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def raw_json(row: Any, max_chars: int = RAW_MAX_CHARS) -> str:
    """The original row as JSON (an invalid JSONL line as itself), cut to ``max_chars``."""
    if isinstance(row, Mapping) and INVALID_JSON_KEY in row and len(row) == 1:
        text = str(row[INVALID_JSON_KEY])
    else:
        try:
            text = json.dumps(row, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(row)
    text = _clean(text)
    if len(text) > max_chars:
        text = text[:max_chars] + f"...[{len(text) - max_chars} more chars]"
    return text


def quarantine_id(row: Any, raw: str) -> str:
    """The row's own id when it has a usable one, else 16 hex chars of sha1 of its raw text."""
    if isinstance(row, Mapping):
        for key in ("id", "prompt_id"):
            value = row.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                return _clean(str(value).strip())
    return hashlib.sha1(_utf8(raw)).hexdigest()[:16]
