"""Gold judges: score (prompt, response) pairs with a reward that is *not* the annotator.

A judge is any callable ``list[(prompt, response)] -> list[float]`` (higher is better).
``load_judge(spec)`` turns a user's string into one:

- ``"vader"``: VADER compound sentiment of the response, in [-1, 1] (the built-in benchmark's
  gold judge: it prefers the more positive, helpful-sounding answer and ignores the prompt);
- ``"textblob"``: TextBlob's polarity of the response, in [-1, 1] (a second lexicon judge that
  made no label, to check that a gain under VADER is not VADER-specific);
- ``"module:function"``: a Python callable with the judge signature, imported by name;
- an annotator folder (``annotator.json``, what `cwpo train-annotator` writes): scored through
  ``load_annotator``, exactly as `cwpo annotate` scores;
- anything else: an HF reward-model folder or hub id (``AutoModelForSequenceClassification``),
  score = logit 0. The text: the tokenizer's chat template when it has one (as Skywork reward
  models are used), else (prompt, response) as a text pair for encoders (OpenAssistant's
  DeBERTa), else the annotator's format ``prompt + "\n" + response``, so a decoder reward model
  without a template gives the same scores as judge and as `cwpo annotate --annotator`. A folder
  whose classifier weights are missing is an error, not a randomly initialized head.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

Judge = Callable[[Sequence[tuple[str, str]]], list[float]]


class VaderJudge:
    """VADER compound score of the response alone. Pure CPU, cheap next to generation."""

    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [float(self._analyzer.polarity_scores(response)["compound"]) for _, response in pairs]


class TextBlobJudge:
    """TextBlob's pattern polarity of the response alone, in [-1, 1]: the second gold judge.

    Why this one: the built-in benchmark's human labels are drawn from VADER and GRA is judged by
    VADER, so a gain could be specific to VADER's lexicon. TextBlob's polarity comes from another
    lexicon (Pattern's, adjectives hand-rated on product reviews, with its own negation and
    intensifier rules), had no part in making any label, and ships inside the PyPI package: it
    scores offline with no corpus download (NLTK's corpora are needed only for other TextBlob
    features). On the shipped pairs it often disagrees with VADER on which response is better
    (docs/METHOD.md, "Two judges"), so it is a different judge, not a copy. Pure CPU.
    """

    name = "textblob"

    def __init__(self):
        from textblob.en.sentiments import PatternAnalyzer

        self._analyzer = PatternAnalyzer()

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [float(self._analyzer.analyze(response)[0]) for _, response in pairs]


def model_device() -> str:
    """Where a judge's model runs: the GPU when this process has one (an evaluation task that holds a
    GPU scores with it, not with its CPU cores), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class AnnotatorJudge:
    """An annotator folder as a judge: its scores are `cwpo annotate`'s."""

    def __init__(self, folder: str, batch_size: int = 64):
        from cwpo_ray.annotator import load_annotator

        self.name, self.batch_size = folder, batch_size
        self.annotator = load_annotator(folder, device=model_device())

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        pairs = list(pairs)
        return self.annotator.score([p for p, _ in pairs], [r for _, r in pairs], self.batch_size)[0]


class RewardModelJudge:
    """A sequence-classification reward model; logit 0 of the (prompt, response) text is the score."""

    def __init__(self, spec: str, batch_size: int = 16, max_length: int = 512):
        from cwpo_ray.annotator import Annotator, AnnotatorMeta, default_max_length
        from cwpo_ray.reward_models import HF_POOLING, SequenceClassifierReward, load_sequence_classifier, match_pad
        from cwpo_ray.models import is_encoder, load_tokenizer, resolve_model

        source = resolve_model(spec)
        self.name = spec
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = load_tokenizer(source)
        # Raises when the checkpoint has no trained classifier (transformers would only warn).
        self.model = load_sequence_classifier(source.path, **source.kwargs()).to(model_device())
        # Decoder reward models find the last real token through the pad id.
        match_pad(self.model, self.tokenizer)
        self.mode = ("chat" if getattr(self.tokenizer, "chat_template", None)
                     else "pair" if is_encoder(self.model.config) else "annotator")
        self.annotator = None
        if self.mode == "annotator":
            meta = AnnotatorMeta(backbone=spec, pooling=HF_POOLING, hf_sequence_classification=True,
                                 max_length=default_max_length(self.model.config, self.tokenizer, max_length))
            self.annotator = Annotator(SequenceClassifierReward(self.model), self.tokenizer, meta)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        pairs = list(pairs)
        if self.annotator is not None:
            return self.annotator.score([p for p, _ in pairs], [r for _, r in pairs], self.batch_size)[0]
        scores: list[float] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            if self.mode == "chat":
                texts = [self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
                    for p, r in chunk]
                # The template already holds the special tokens (a second BOS would shift the scores).
                enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     add_special_tokens=False, return_tensors="pt")
            else:
                enc = self.tokenizer([p for p, _ in chunk], [r for _, r in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**enc.to(self.model.device)).logits
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


def looks_like_callable(spec: str) -> bool:
    # "pkg.mod:fn" (a Windows drive "C:\..." or an existing path is not a callable spec)
    module, sep, attr = spec.partition(":")
    return bool(sep and module and attr and not Path(spec).exists()
                and all(p.isidentifier() for p in module.split(".") + attr.split(".")))


def load_judge(spec: str) -> Judge:
    """``"vader"``, ``"module:function"``, an annotator folder or a reward-model folder / hub id -> a judge."""
    from cwpo_ray.annotator import META_FILE

    spec = spec.strip()
    if spec.lower() == "vader":
        return VaderJudge()
    if spec.lower() == "textblob":
        return TextBlobJudge()
    if looks_like_callable(spec):
        return _import_callable(spec)
    if (Path(spec) / META_FILE).is_file():
        return AnnotatorJudge(spec)
    return RewardModelJudge(spec)


def judge_name(judge: Judge) -> str:
    return getattr(judge, "name", None) or getattr(judge, "__qualname__", None) or type(judge).__name__
