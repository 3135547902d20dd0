"""Gold judges: score (prompt, response) pairs with a reward that is *not* the annotator.

A judge is any callable ``list[(prompt, response)] -> list[float]`` (higher is better).
``load_judge(spec)`` turns a user's string into one:

- ``"vader"``: VADER compound sentiment of the response, in [-1, 1] (the built-in benchmark's
  gold judge: it prefers the more positive, helpful-sounding answer and ignores the prompt);
- ``"module:function"``: a Python callable with the judge signature, imported by name;
- anything else: an HF reward-model folder or hub id (``AutoModelForSequenceClassification``),
  score = logit 0 of ``prompt + response`` (as Skywork / OpenAssistant reward models use it).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

Judge = Callable[[Sequence[tuple[str, str]]], list[float]]


class VaderJudge:
    """VADER compound score of the response alone. Pure CPU, ~10k responses/s."""

    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [float(self._analyzer.polarity_scores(response)["compound"]) for _, response in pairs]


class RewardModelJudge:
    """A sequence-classification reward model; logit 0 of the (prompt, response) text is the score."""

    def __init__(self, spec: str, batch_size: int = 16, max_length: int = 512):
        from cwpo_ray.models import load_tokenizer, resolve_model

        from transformers import AutoModelForSequenceClassification

        source = resolve_model(spec)
        self.name = spec
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = load_tokenizer(source)
        self.model = AutoModelForSequenceClassification.from_pretrained(source.path, **source.kwargs()).eval()
        if self.model.config.pad_token_id is None:
            # Decoder reward models find the last real token through the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _texts(self, pairs):
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
                for p, r in pairs]
        return None  # encoder RMs take (prompt, response) as a text pair

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        scores: list[float] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = list(pairs[i:i + self.batch_size])
            texts = self._texts(chunk)
            if texts is not None:
                enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
            else:
                enc = self.tokenizer([p for p, _ in chunk], [r for _, r in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**enc).logits
            scores += logits[:, 0].float().tolist()
        return scores


def _import_callable(spec: str) -> Judge:
    module_name, _, attr = spec.partition(":")
    fn = importlib.import_module(module_name)
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"judge {spec!r} is not callable")
    return fn


def _looks_like_callable(spec: str) -> bool:
    # "pkg.mod:fn" (a Windows drive "C:\..." or an existing path is not a callable spec)
    module, sep, attr = spec.partition(":")
    return bool(sep and module and attr and not Path(spec).exists()
                and all(p.isidentifier() for p in module.split(".") + attr.split(".")))


def load_judge(spec: str) -> Judge:
    """``"vader"``, ``"module:function"`` or a reward-model folder / hub id -> a judge callable."""
    spec = spec.strip()
    if spec.lower() == "vader":
        return VaderJudge()
    if _looks_like_callable(spec):
        return _import_callable(spec)
    return RewardModelJudge(spec)


def judge_name(judge: Judge) -> str:
    return getattr(judge, "name", None) or getattr(judge, "__qualname__", None) or type(judge).__name__
