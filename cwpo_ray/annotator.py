"""The weak annotator: a pretrained backbone with a scalar reward head.

Plain torch/transformers, no Ray. ``Annotator`` is what `cwpo annotate`, `cwpo serve`,
evaluation and judges share, so a pair gets the same scores everywhere.

Two layouts on disk (docs/ANNOTATOR_FORMAT.md):

- decoders whose transformers ``*ForSequenceClassification`` class scores the last non-pad
  token (Llama, Qwen2, OPT, GPT-2, ...): the annotator *is* that class with one label, saved
  with ``save_pretrained``, so ``AutoModelForSequenceClassification.from_pretrained(folder)``
  gives the same scores outside cwpo-ray. Any one-label reward model in that format (e.g. one
  trained with TRL's RewardTrainer) loads as an annotator too.
- encoders (first-token or mean pooling) and other poolings: the backbone via
  ``save_pretrained`` plus ``reward_head.pt``; transformers has no class that pools that way
  (BERT's adds a pooler layer), so only ``load_annotator`` reads these.

Input text is ``prompt + separator + response``. When that is longer than
``max_length`` tokens, the prompt is cut from the left (its end, nearest the response,
survives); only when the response alone does not fit is the response cut from the right.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cwpo_ray.engines import autocast
from cwpo_ray.losses import confidence
from cwpo_ray.models import ModelSource, is_encoder, load_backbone, load_tokenizer, plain_weights
from cwpo_ray.reward_models import (HF_POOLING, RewardModel, SequenceClassifierReward, default_pooling, init_head,
                                    is_hf_reward_model, load_sequence_classifier, match_pad,
                                    sequence_classification_class)

HEAD_FILE = "reward_head.pt"
META_FILE = "annotator.json"
# train-annotator's keep_fold_models: the k fold models at the chosen epoch, FOLDS_DIR/fold-F/, each an
# annotator folder of its own; annotator.json's "fold_models" names them (docs/ANNOTATOR_FORMAT.md)
FOLDS_DIR = "folds"
FORMAT_VERSION = 2  # 2: text_format and hf_sequence_classification recorded; 1 (no such keys) still loads
DEFAULT_SEPARATOR = "\n"
DEFAULT_MAX_LENGTH = 512


@dataclass
class AnnotatorMeta:
    """What ``annotator.json`` holds next to the weights."""

    backbone: str
    pooling: str
    max_length: int
    separator: str = DEFAULT_SEPARATOR
    data_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # True: the folder loads with AutoModelForSequenceClassification (num_labels 1) and scores the same.
    hf_sequence_classification: bool = False
    hf_note: str = ""  # the HF class used, or why the folder is not HF-loadable
    text_format: dict = field(default_factory=dict)  # how a (prompt, response) becomes token ids; written on save
    # Confidence calibration: C = 2(sigma(|r_a - r_b| / T) - 1/2), T fit by train-annotator on held-out
    # margins; 1.0 (no scaling) for a folder written before calibration existed.
    temperature: float = 1.0

    @classmethod
    def from_json(cls, text: str) -> "AnnotatorMeta":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # keys of newer versions are ignored


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds around a single text (e.g. [CLS] ... [SEP], or a BOS)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
           separator: str = DEFAULT_SEPARATOR) -> tuple[list[list[int]], list[bool]]:
    """Token ids of ``prompt + separator + response`` under the truncation rule; and which were cut."""
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 2:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    p_ids = tokenizer([p + separator for p in prompts], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out, truncated = [], []
    for p, r in zip(p_ids, r_ids):
        cut = len(p) + len(r) > budget
        r = r[:budget]
        keep = budget - len(r)
        p = p[len(p) - keep:] if keep > 0 else []
        out.append(prefix + p + r + suffix)
        truncated.append(cut)
    return out, truncated


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def text_format(tokenizer, meta: AnnotatorMeta) -> dict:
    """How a (prompt, response) becomes the ids that are scored, for annotator.json (docs/ANNOTATOR_FORMAT.md)."""
    prefix, suffix = special_tokens(tokenizer)
    scored = ("logit 0 of the model at the last token that is not pad_token_id"
              if meta.hf_sequence_classification else
              {"last": "reward_head.pt on the last hidden state of the last token (attention mask)",
               "first": "reward_head.pt on the last hidden state of the first token",
               "mean": "reward_head.pt on the attention-masked mean of the last hidden states"}.get(meta.pooling, ""))
    return {
        "text": "prompt + separator + response (no chat template)",
        "separator": meta.separator,
        "tokens": "tokenizer(prompt + separator, add_special_tokens=False) followed by "
                  "tokenizer(response, add_special_tokens=False), then the special tokens around them",
        "special_tokens_before": prefix,
        "special_tokens_after": suffix,
        "max_length": meta.max_length,
        "truncation": "over max_length: the prompt + separator tokens are cut from the left; "
                      "the response is cut from the right only when it alone does not fit",
        "padding_side": "right",
        "pad_token_id": tokenizer.pad_token_id,
        "score": scored,
    }


PRECISIONS = ("fp32", "bf16")  # what a model is scored in
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what a user may ask for; auto is resolved per device


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA GPU with bf16 units (Ampere and later;
    emulated bf16 on older GPUs is not counted), a CPU with AVX512-BF16 or AMX-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch.cpu.get_capabilities() is public (torch.cpu.__all__, documented) and reads the CPU's
        # feature flags via cpuinfo on any OS; torch.cpu._is_avx512_bf16_supported / _is_amx_tile_supported
        # and torch.ops.mkldnn._is_mkldnn_bf16_supported say the same but are private. Without these
        # flags bf16 matmuls are emulated (no bf16 instructions to gain from), so auto keeps fp32 there.
        caps = getattr(torch.cpu, "get_capabilities", None)
        if caps is None:  # older torch: no public query, keep fp32
            return False
        flags = caps()
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16": what ``precision`` (auto, fp32, bf16) scores in on ``device``. auto is bf16
    where the device has fast bf16 (``fast_bf16``), fp32 elsewhere (how bf16's labels differ from
    fp32's: bench/RESULTS.md, "bf16 annotation with a trained annotator")."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISION_CHOICES)}")
    return precision


class Annotator:
    """A reward model with its tokenizer and metadata: scores texts and labels pairs.

    ``precision`` ("fp32" or "bf16", already resolved: see ``resolve_precision``) is how ``score`` runs the
    model; weights stay fp32 either way."""

    def __init__(self, model: nn.Module, tokenizer, meta: AnnotatorMeta, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.model, self.tokenizer, self.meta, self.precision = model, tokenizer, meta, precision

    @property
    def name(self) -> str:
        return self.meta.backbone

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """The token ids this annotator scores (the text format of annotator.json)."""
        return encode(self.tokenizer, prompts, responses, self.meta.max_length, self.meta.separator)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> tuple[list[float], list[bool]]:
        """Reward of each (prompt, response), batched with sequences sorted by length to cut padding."""
        seqs, truncated = self.encode(prompts, responses)
        return self.score_ids(seqs, batch_size), truncated

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 64) -> list[float]:
        """Reward of each encoded sequence (``encode``'s ids); an ensemble of annotators with one text
        format encodes once and scores the same ids with each."""
        self.model.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        rewards = [0.0] * len(seqs)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = collate([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            with autocast(self.precision, device):  # bf16: matmuls in bfloat16, the rewards returned as fp32
                out = self.model(**{k: v.to(device) for k, v in batch.items()})
            out = out.float().cpu().tolist()
            for i, r in zip(idx, out):
                rewards[i] = r
        return rewards

    def label_pairs(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                    batch_size: int = 64) -> dict[str, list]:
        """Rewards of both responses, which one is preferred, and the confidence of that call:
        calibrated with the annotator's temperature (``confidence``) and raw, T = 1 (``confidence_raw``)."""
        n = len(prompts)
        rewards, truncated = self.score(list(prompts) * 2, list(responses_a) + list(responses_b), batch_size)
        ra, rb = torch.tensor(rewards[:n], dtype=torch.float64), torch.tensor(rewards[n:], dtype=torch.float64)
        raw = confidence(ra, rb) if n else torch.zeros(0, dtype=torch.float64)
        conf = confidence(ra, rb, self.meta.temperature) if n else raw
        return {
            "reward_a": ra.tolist(),
            "reward_b": rb.tolist(),
            "preferred": ["a" if a >= b else "b" for a, b in zip(ra.tolist(), rb.tolist())],
            "confidence": conf.tolist(),
            "confidence_raw": raw.tolist(),
            "truncated": [ta or tb for ta, tb in zip(truncated[:n], truncated[n:])],
        }


# ----------------------------------------------------------------------------- which layout a new annotator takes

def hf_layout_refusal(config, pooling: str, tokenizer) -> str:
    """Why a fresh annotator cannot be a standard HF sequence classifier ("" when it can)."""
    if is_encoder(config):
        return (f"encoder ({config.model_type}, pooling {pooling!r}): its transformers class pools "
                "differently (BERT's adds a pooler layer), so the backbone and reward_head.pt are saved and only "
                "cwpo_ray's load_annotator reads them")
    if pooling != "last":
        return (f"pooling {pooling!r}: transformers' sequence-classification classes of decoders score the last "
                "token only, so the backbone and reward_head.pt are saved and only cwpo_ray's load_annotator reads them")
    if sequence_classification_class(config) is None:
        return f"transformers has no sequence-classification class for model type {config.model_type!r}"
    _, suffix = special_tokens(tokenizer)
    if tokenizer.pad_token_id in suffix:
        # HF's class reads the last token that is not pad_token_id: it would skip the appended token.
        return (f"the tokenizer appends its pad token (id {tokenizer.pad_token_id}) to every text, so transformers' "
                "class would score the token before it")
    return ""


def default_max_length(config, tokenizer=None, wanted: int = DEFAULT_MAX_LENGTH) -> int:
    limits = [wanted, getattr(config, "max_position_embeddings", None)]
    if tokenizer is not None and (getattr(tokenizer, "model_max_length", 0) or 0) < 1_000_000:
        limits.append(tokenizer.model_max_length)  # unset limits are a huge sentinel
    return min(x for x in limits if x)


# ----------------------------------------------------------------------------- create, save, load

def new_annotator(source: ModelSource, pooling: str | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                  separator: str = DEFAULT_SEPARATOR) -> Annotator:
    """A fresh annotator from a pretrained backbone, with a new scalar head.

    Decoders with last-token pooling become transformers' sequence-classification class for
    their architecture (one label); everything else a backbone + our own head.
    """
    from transformers import AutoConfig

    tokenizer = load_tokenizer(source)
    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    pooling = pooling or default_pooling(config)
    max_length = default_max_length(config, wanted=max_length)
    refusal = hf_layout_refusal(config, pooling, tokenizer)
    if not refusal:
        from transformers import AutoModelForSequenceClassification

        hf = plain_weights(AutoModelForSequenceClassification.from_pretrained(
            source.path, num_labels=1, dtype=torch.float32, **source.kwargs()))
        match_pad(hf, tokenizer)
        model = SequenceClassifierReward(hf)
        init_head(model.head)  # ours, not HF's 0.02 std: the same reward scale as the encoder head
        note = type(hf).__name__
    else:
        backbone = load_backbone(source)
        backbone.config.pad_token_id = tokenizer.pad_token_id
        model = RewardModel(backbone, pooling)
        note = refusal
    meta = AnnotatorMeta(backbone=str(source), pooling=pooling, max_length=max_length, separator=separator,
                         hf_sequence_classification=not refusal, hf_note=note)
    return Annotator(model, tokenizer, meta)


def save_annotator(annotator: Annotator, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Weights and tokenizer via save_pretrained, metadata (with the text format) as JSON.

    HF layout: the whole sequence classifier, loadable with AutoModelForSequenceClassification.
    Own layout: the backbone, and the head in ``reward_head.pt``. ``state_dict`` (a full
    state dict of ``annotator.model``, e.g. gathered from a distributed engine) is saved
    instead of the model's own parameters when given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = annotator.model.state_dict()
    model = annotator.model
    if isinstance(model, SequenceClassifierReward):
        hf_sd = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        missing = set(model.hf.state_dict()) - set(hf_sd)
        if missing:
            raise ValueError(f"state dict lacks {sorted(missing)[:5]}")
        model.hf.config.num_labels = 1
        model.hf.save_pretrained(folder, state_dict=hf_sd)
        (folder / HEAD_FILE).unlink(missing_ok=True)  # a stale head from an older save would mislead
    else:
        backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_sd = {k[len("head."):]: v.detach().cpu() for k, v in state_dict.items() if k.startswith("head.")}
        if set(head_sd) != {"weight", "bias"}:
            raise ValueError(f"state dict has no complete reward head (head keys: {sorted(head_sd)})")
        model.backbone.save_pretrained(folder, state_dict=backbone_sd)
        # The head is saved explicitly: reward heads get lost or re-initialized otherwise (a known failure under LoRA and ZeRO-3 elsewhere).
        torch.save(head_sd, folder / HEAD_FILE)
    annotator.tokenizer.save_pretrained(folder)
    meta = annotator.meta
    meta.format_version = FORMAT_VERSION
    meta.hf_sequence_classification = isinstance(model, SequenceClassifierReward)
    meta.text_format = text_format(annotator.tokenizer, meta)
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
    return folder


def fold_model_dirs(folder: str | Path) -> list[Path]:
    """The fold models an annotator folder keeps (train-annotator's keep_fold_models), in fold order, as
    its annotator.json's "fold_models" names them; [] for a folder without them."""
    folder = Path(folder)
    meta = folder / META_FILE
    info = json.loads(meta.read_text()).get("fold_models") if meta.is_file() else None
    if not info:
        return []
    return [folder / info.get("folder", FOLDS_DIR) / name for name in info["folds"]]


def _load_saved_backbone(source: ModelSource):
    """The saved backbone, without the BERT-style pooler it was saved without (no 'newly initialized' warning)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(source.path, dtype=torch.float32, add_pooling_layer=False)
    except TypeError:  # backbones without a pooler do not take the argument
        return load_backbone(source)


def load_annotator(folder: str | Path, device: str = "cpu", precision: str = "fp32") -> Annotator:
    """An annotator folder (``save_annotator``, any version) or a one-label HF reward-model folder.

    - annotator.json saying ``hf_sequence_classification``: AutoModelForSequenceClassification;
    - annotator.json otherwise (encoders; decoders saved before the HF layout): backbone + reward_head.pt;
    - no annotator.json, config.json with one label and a ``*ForSequenceClassification``
      architecture (e.g. a TRL RewardTrainer output): that class, scored in the default text
      format (prompt + "\\n" + response, max_length up to 512).

    ``precision``: fp32, bf16, or auto (resolved on ``device`` by ``resolve_precision``); the
    annotator's ``precision`` is the resolved one.
    """
    precision = resolve_precision(precision, device)  # first: a bad value fails before any loading
    folder = Path(folder)
    source = ModelSource(str(folder))
    if (folder / META_FILE).is_file():
        meta = AnnotatorMeta.from_json((folder / META_FILE).read_text())
        if meta.hf_sequence_classification:
            model = SequenceClassifierReward(load_sequence_classifier(str(folder)))
        else:
            if not (folder / HEAD_FILE).is_file():
                raise FileNotFoundError(f"{folder} is not a complete annotator folder: {HEAD_FILE} missing")
            model = RewardModel(_load_saved_backbone(source), meta.pooling)
            model.head.load_state_dict(torch.load(folder / HEAD_FILE, map_location="cpu"))
    elif is_hf_reward_model(folder):
        model = SequenceClassifierReward(load_sequence_classifier(str(folder)))
        meta = AnnotatorMeta(backbone=str(folder), pooling=HF_POOLING, max_length=0,
                             hf_sequence_classification=True,
                             hf_note=f"{type(model.hf).__name__} reward model without annotator.json: "
                                     "scored in the default text format")
    else:
        raise FileNotFoundError(
            f"{folder} is neither an annotator folder ({META_FILE}) nor a Hugging Face reward model "
            "(config.json with one label and a *ForSequenceClassification architecture)")
    tokenizer = load_tokenizer(source)
    if isinstance(model, SequenceClassifierReward):
        match_pad(model.hf, tokenizer)
    if not meta.max_length:
        meta.max_length = default_max_length(model.hf.config, tokenizer)
    if not meta.text_format:
        meta.text_format = text_format(tokenizer, meta)
    model.to(device).eval()
    return Annotator(model, tokenizer, meta, precision)
