"""The reward model modules an annotator is made of, and transformers' sequence-classification layout.

Plain torch/transformers, no tokenizers and no files of ours: ``RewardModel`` (a backbone, a
pooling and our own scalar head) and ``SequenceClassifierReward`` (a transformers
``*ForSequenceClassification`` class with one label). ``cwpo_ray.annotator`` builds, saves and
loads annotators from these.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from cwpo_ray.models import is_encoder, plain_weights

POOLINGS = ("last", "first", "mean")
HF_POOLING = "hf"  # scored by a transformers sequence-classification class's own pooling


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


def init_head(linear: nn.Linear) -> None:
    """The reward head's init: unit-scale rewards at the start whatever the hidden size."""
    nn.init.normal_(linear.weight, std=1.0 / math.sqrt(linear.in_features + 1))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class RewardModel(nn.Module):
    """Backbone hidden states -> pooled vector -> one scalar reward per sequence (our own layout)."""

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
        init_head(self.head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(pool_hidden(hidden, attention_mask, self.pooling)).squeeze(-1)


class SequenceClassifierReward(nn.Module):
    """A transformers ``*ForSequenceClassification`` model with one label: logit 0 is the reward.

    The model's own forward does the pooling (for decoders: the last token that is not
    ``config.pad_token_id``), so training, `cwpo annotate`, `cwpo serve` and anyone loading
    the folder with ``AutoModelForSequenceClassification`` compute the very same function.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model needs num_labels 1, this one has {model.config.num_labels}")
        self.hf = model

    @property
    def head(self) -> nn.Linear:
        """The score layer (``score`` in Llama/Qwen2/OPT/GPT-2): the one linear outside the base model."""
        return classifier_head(self.hf)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


def classifier_head(model: nn.Module) -> nn.Linear:
    """The linear layer a sequence-classification model adds to its base model; error when not exactly one."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [m for name, m in model.named_children() if name != prefix]
    linears = [m for m in heads if isinstance(m, nn.Linear)]
    if len(heads) != 1 or len(linears) != 1:
        raise ValueError(f"{type(model).__name__}: expected one linear layer besides {prefix!r}, "
                         f"found {[name for name, _ in model.named_children() if name != prefix]}")
    return linears[0]


def sequence_classification_class(config):
    """transformers' ``*ForSequenceClassification`` class for this config, or None."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        return None


def match_pad(model: nn.Module, tokenizer) -> None:
    """Make the batches' pad id the one the HF class skips when it looks for the last token.

    The config's value wins when it has one (it is what anyone else loading the folder uses);
    else the tokenizer's pad (load_tokenizer falls back to eos) is written into the config.
    """
    config = model.config
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    elif config.pad_token_id != tokenizer.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config and text_config.pad_token_id is None:
        text_config.pad_token_id = config.pad_token_id


def load_sequence_classifier(path: str, **kwargs) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` in fp32 that refuses to invent weights.

    transformers only warns when a checkpoint lacks the classifier and initializes it at
    random; a reward model scored that way is noise, so that is an error here.
    """
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, **kwargs)
    fresh = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if fresh:
        raise ValueError(f"{path} is not a trained sequence-classification model: loading it with "
                         f"{type(model).__name__} would initialize {', '.join(fresh[:5])} at random")
    return plain_weights(model).eval()


def is_hf_reward_model(folder: str | Path) -> bool:
    """A folder whose config.json declares one label and a ``*ForSequenceClassification`` architecture."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    archs = config.get("architectures") or []
    return labels == 1 and any(str(a).endswith("ForSequenceClassification") for a in archs)
