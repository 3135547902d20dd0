"""The weak annotator: any HF backbone with its LM head bypassed and a scalar reward head.

Plain torch/transformers, no Ray. ``Annotator`` is what `cwpo annotate`, `cwpo serve`
and evaluation share, so a pair gets the same scores everywhere.

Input text is ``prompt + separator + response``. When that is longer than
``max_length`` tokens, the prompt is cut from the left (its end, nearest the response,
survives); only when the response alone does not fit is the response cut from the right.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cwpo_ray.losses import confidence
from cwpo_ray.models import ModelSource, is_encoder, load_backbone, load_tokenizer

POOLINGS = ("last", "first", "mean")
HEAD_FILE = "reward_head.pt"
META_FILE = "annotator.json"


@dataclass
class AnnotatorMeta:
    """What ``annotator.json`` holds next to the weights."""

    backbone: str
    pooling: str
    max_length: int
    separator: str = "\n"
    data_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    format_version: int = 1


def default_pooling(config) -> str:
    return "first" if is_encoder(config) else "last"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the last non-pad token, the first token, or the masked mean."""
    if pooling == "first":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        # Position of the last 1 in the mask: correct for left and right padding alike.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * attention_mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")


class RewardModel(nn.Module):
    """Backbone hidden states -> pooled vector -> one scalar reward per sequence."""

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        if getattr(backbone, "pooler", None) is not None:
            # BERT-style poolers are never read (the head pools last_hidden_state itself); left in
            # place they get no gradient, which DDP rejects, and their weights would be saved for nothing.
            backbone.pooler = None
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(backbone.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(pool_hidden(hidden, attention_mask, self.pooling)).squeeze(-1)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds around a single text (e.g. [CLS] ... [SEP], or a BOS)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
           separator: str = "\n") -> tuple[list[list[int]], list[bool]]:
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


class Annotator:
    """A reward model with its tokenizer and metadata: scores texts and labels pairs."""

    def __init__(self, model: RewardModel, tokenizer, meta: AnnotatorMeta):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta

    @property
    def name(self) -> str:
        return self.meta.backbone

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> tuple[list[float], list[bool]]:
        """Reward of each (prompt, response), batched with sequences sorted by length to cut padding."""
        self.model.eval()
        seqs, truncated = encode(self.tokenizer, prompts, responses, self.meta.max_length, self.meta.separator)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        rewards = [0.0] * len(seqs)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = collate([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            out = self.model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().tolist()
            for i, r in zip(idx, out):
                rewards[i] = r
        return rewards, truncated

    def label_pairs(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                    batch_size: int = 64) -> dict[str, list]:
        """Rewards of both responses, which one is preferred, and the confidence of that call."""
        n = len(prompts)
        rewards, truncated = self.score(list(prompts) * 2, list(responses_a) + list(responses_b), batch_size)
        ra, rb = torch.tensor(rewards[:n], dtype=torch.float64), torch.tensor(rewards[n:], dtype=torch.float64)
        conf = confidence(ra, rb) if n else torch.zeros(0, dtype=torch.float64)
        return {
            "reward_a": ra.tolist(),
            "reward_b": rb.tolist(),
            "preferred": ["a" if a >= b else "b" for a, b in zip(ra.tolist(), rb.tolist())],
            "confidence": conf.tolist(),
            "truncated": [ta or tb for ta, tb in zip(truncated[:n], truncated[n:])],
        }


def new_annotator(source: ModelSource, pooling: str | None = None, max_length: int = 512,
                  separator: str = "\n") -> Annotator:
    """A fresh annotator from a pretrained backbone, with a new scalar head."""
    tokenizer = load_tokenizer(source)
    backbone = load_backbone(source)
    pooling = pooling or default_pooling(backbone.config)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit:
        max_length = min(max_length, limit)
    backbone.config.pad_token_id = tokenizer.pad_token_id
    meta = AnnotatorMeta(backbone=str(source), pooling=pooling, max_length=max_length, separator=separator)
    return Annotator(RewardModel(backbone, pooling), tokenizer, meta)


def save_annotator(annotator: Annotator, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Backbone and tokenizer via save_pretrained, the head in its own file, metadata as JSON.

    ``state_dict`` (a full ``RewardModel`` state dict, e.g. gathered from a distributed
    engine) is saved instead of the model's own parameters when given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = annotator.model.state_dict()
    backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    head_sd = {k[len("head."):]: v.detach().cpu() for k, v in state_dict.items() if k.startswith("head.")}
    if set(head_sd) != {"weight", "bias"}:
        raise ValueError(f"state dict has no complete reward head (head keys: {sorted(head_sd)})")
    annotator.model.backbone.save_pretrained(folder, state_dict=backbone_sd)
    annotator.tokenizer.save_pretrained(folder)
    # The head is saved explicitly: reward heads get lost or re-initialized otherwise (a known failure under LoRA and ZeRO-3 elsewhere).
    torch.save(head_sd, folder / HEAD_FILE)
    (folder / META_FILE).write_text(json.dumps(asdict(annotator.meta), indent=2))
    return folder


def _load_saved_backbone(source: ModelSource):
    """The saved backbone, without the BERT-style pooler it was saved without (no 'newly initialized' warning)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(source.path, dtype=torch.float32, add_pooling_layer=False)
    except TypeError:  # backbones without a pooler do not take the argument
        return load_backbone(source)


def load_annotator(folder: str | Path, device: str = "cpu") -> Annotator:
    """An annotator saved by ``save_annotator``, giving identical scores."""
    folder = Path(folder)
    for name in (META_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a complete annotator folder: {name} missing")
    meta = AnnotatorMeta(**json.loads((folder / META_FILE).read_text()))
    source = ModelSource(str(folder))
    model = RewardModel(_load_saved_backbone(source), meta.pooling)
    model.head.load_state_dict(torch.load(folder / HEAD_FILE, map_location="cpu"))
    model.to(device).eval()
    return Annotator(model, load_tokenizer(source), meta)
