"""The annotator as a standard Hugging Face reward model, judges on annotator folders, engine lifecycles.

No Ray here: folders are written and read in-process with tiny models (tests/tiny_models.py,
plus tiny GPT-2 and OPT decoders built below on the same tokenizer), and read back with plain
``AutoModelForSequenceClassification``, as someone outside cwpo-ray would.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from cwpo_ray.annotator import HEAD_FILE, META_FILE, collate, load_annotator, new_annotator, save_annotator
from cwpo_ray.judges import AnnotatorJudge, load_judge
from cwpo_ray.models import ModelSource
from cwpo_ray.reward_models import RewardModel
from tiny_models import build_decoder_tokenizer, synthetic_pairs

PROMPTS = ["Tell me about rain.", "Tell me about cats.", "Tell me a long story about bees. " * 12, "hi"]
RESPONSES = ["rain is good.", "cats are awful and rude.", "bees are kind.", "hello there, happy to help"]


def build_tiny(kind: str, folder: Path, pad_is_eos: bool = False) -> Path:
    """A 2-layer causal LM of ``kind`` (gpt2, opt) with the tiny BPE tokenizer; GPT-2 style
    (no pad token: pad falls back to eos) when ``pad_is_eos``."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    tok = build_decoder_tokenizer(folder)
    if pad_is_eos:
        tok.pad_token = None
        tok.save_pretrained(folder)
    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    torch.manual_seed(1)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=None if pad_is_eos else pad)
        GPT2LMHeadModel(config).save_pretrained(folder)
    else:
        config = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=pad,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        OPTForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoders(tiny_decoder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {"llama": tiny_decoder,
            "gpt2-pad-is-eos": build_tiny("gpt2", root / "gpt2", pad_is_eos=True),
            "opt": build_tiny("opt", root / "opt")}


def hf_load(folder: Path):
    """What a user outside cwpo-ray does: AutoModelForSequenceClassification + AutoTokenizer, and the load report."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder), info


def hf_scores(model, tokenizer, ids: list[list[int]]) -> list[float]:
    """Logit 0 of HF's own class on right-padded ids (padded by the saved tokenizer itself)."""
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0].tolist()


# ----------------------------------------------------------------------------- (a) decoders save in the HF layout

@pytest.mark.parametrize("kind", ["llama", "gpt2-pad-is-eos", "opt"])
def test_decoder_annotator_is_a_standard_hf_reward_model(decoders, kind, tmp_path):
    torch.manual_seed(3)
    ann = new_annotator(ModelSource(str(decoders[kind])), max_length=48)
    assert ann.meta.hf_sequence_classification
    with torch.no_grad():
        ann.model.head.weight.add_(0.25)  # a head that differs from any fresh init
    ours, cut = ann.score(PROMPTS, RESPONSES)
    assert cut[2] and not cut[0]  # the long prompt is cut (from the left) and still scores the same below
    folder = save_annotator(ann, tmp_path / "ann")

    assert not (folder / HEAD_FILE).exists()
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["hf_sequence_classification"] is True and meta["format_version"] == 2
    fmt = meta["text_format"]
    assert fmt["separator"] == "\n" and fmt["max_length"] == 48 and fmt["padding_side"] == "right"
    assert fmt["pad_token_id"] == ann.tokenizer.pad_token_id

    model, tokenizer, info = hf_load(folder)
    assert type(model).__name__ == meta["hf_note"]
    assert model.config.num_labels == 1
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    assert model.config.pad_token_id == tokenizer.pad_token_id == fmt["pad_token_id"]
    ids, _ = ann.encode(PROMPTS, RESPONSES)
    assert hf_scores(model, tokenizer, ids) == pytest.approx(ours, abs=1e-4)
    # one text at a time too: no padding at all
    assert [hf_scores(model, tokenizer, [x])[0] for x in ids] == pytest.approx(ours, abs=1e-4)
    # the text format in annotator.json, followed literally from the folder's own tokenizer
    prefix, suffix = fmt["special_tokens_before"], fmt["special_tokens_after"]
    by_hand = [prefix + tokenizer(p + fmt["separator"], add_special_tokens=False)["input_ids"]
               + tokenizer(r, add_special_tokens=False)["input_ids"] + suffix for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    assert by_hand == ids[:2]

    again = load_annotator(folder)
    assert again.meta.hf_sequence_classification
    assert again.score(PROMPTS, RESPONSES)[0] == pytest.approx(ours, abs=1e-6)


def test_pad_equal_to_eos_scores_as_hf_does(decoders, tmp_path):
    """pad == eos (GPT-2 has no pad token): a text ending in the eos string is scored at the token before,
    by HF's class and by the annotator alike, since the annotator *is* that class."""
    ann = new_annotator(ModelSource(str(decoders["gpt2-pad-is-eos"])), max_length=48)
    eos = ann.tokenizer.eos_token
    assert ann.tokenizer.pad_token_id == ann.tokenizer.eos_token_id == ann.model.hf.config.pad_token_id
    folder = save_annotator(ann, tmp_path / "ann")
    responses = ["rain is good." + eos, "rain is good."]
    ours, _ = load_annotator(folder).score(["Tell me about rain."] * 2, responses)
    assert ours[0] == pytest.approx(ours[1], abs=1e-6)  # the trailing eos is padding to the classifier
    model, tokenizer, _ = hf_load(folder)
    ids, _ = ann.encode(["Tell me about rain."] * 2, responses)
    assert hf_scores(model, tokenizer, ids) == pytest.approx(ours, abs=1e-4)


def test_older_decoder_folder_with_reward_head_still_loads(tiny_decoder, tmp_path):
    """A decoder annotator saved before the HF layout: backbone + reward_head.pt, annotator.json v1."""
    from cwpo_ray.models import load_backbone, load_tokenizer

    source = ModelSource(str(tiny_decoder))
    tokenizer = load_tokenizer(source)
    torch.manual_seed(5)
    model = RewardModel(load_backbone(source), "last").eval()
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    folder = tmp_path / "old"
    model.backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({k: v for k, v in model.head.state_dict().items()}, folder / HEAD_FILE)
    (folder / META_FILE).write_text(json.dumps({
        "backbone": str(tiny_decoder), "pooling": "last", "max_length": 48, "separator": "\n",
        "data_fingerprint": "", "metrics": {}, "format_version": 1}))
    loaded = load_annotator(folder)
    assert not loaded.meta.hf_sequence_classification and isinstance(loaded.model, RewardModel)
    ids, _ = loaded.encode(PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = model(**collate(ids, tokenizer.pad_token_id)).tolist()
    assert loaded.score(PROMPTS, RESPONSES)[0] == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- (b) any one-label HF reward model

@pytest.fixture(scope="module")
def plain_reward_model(tiny_decoder, tmp_path_factory) -> Path:
    """What TRL's RewardTrainer leaves: AutoModelForSequenceClassification(num_labels=1) + tokenizer, no annotator.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("plain-rm")
    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_decoder).save_pretrained(folder)
    return folder


def test_plain_hf_reward_model_works_as_annotator_and_judge(plain_reward_model):
    assert not (plain_reward_model / META_FILE).exists()
    ann = load_annotator(plain_reward_model)
    assert ann.meta.hf_sequence_classification and ann.meta.pooling == "hf" and ann.meta.max_length == 512
    rows = synthetic_pairs(6, seed=4)
    prompts = [r["prompt"] for r in rows]
    labels = ann.label_pairs(prompts, [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    model, tokenizer, info = hf_load(plain_reward_model)
    assert not info["missing_keys"]
    ids, _ = ann.encode(prompts, [r["chosen"] for r in rows])
    assert labels["reward_a"] == pytest.approx(hf_scores(model, tokenizer, ids), abs=1e-4)
    assert len(set(labels["preferred"])) >= 1 and all(0 <= c < 1 for c in labels["confidence"])

    judge = load_judge(str(plain_reward_model))
    assert not isinstance(judge, AnnotatorJudge)
    got = judge(list(zip(prompts, [r["chosen"] for r in rows])))
    assert got == pytest.approx(labels["reward_a"], abs=1e-6)


def test_a_folder_without_a_trained_head_is_refused(tiny_decoder, tiny_encoder):
    """A bare backbone would get a random classifier from transformers (a warning only): here an error."""
    for folder in (tiny_decoder, tiny_encoder):
        with pytest.raises(ValueError, match="initialize .*at random"):
            load_judge(str(folder))
        with pytest.raises(FileNotFoundError, match="neither an annotator folder"):
            load_annotator(folder)


# ----------------------------------------------------------------------------- (c) judges on annotator folders

@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_load_judge_on_an_annotator_folder_scores_like_the_annotator(tiny_encoder, tiny_decoder, backbone, tmp_path):
    """The bug: --judge ANNOTATOR_DIR built a sequence classifier with an untrained head."""
    torch.manual_seed(11)
    ann = new_annotator(ModelSource(str(tiny_encoder if backbone == "encoder" else tiny_decoder)), max_length=48)
    with torch.no_grad():
        ann.model.head.weight.mul_(3.0)
    folder = save_annotator(ann, tmp_path / "ann")
    judge = load_judge(str(folder))
    assert isinstance(judge, AnnotatorJudge)
    expected, _ = load_annotator(folder).score(PROMPTS, RESPONSES)
    assert judge(list(zip(PROMPTS, RESPONSES))) == expected
    assert expected == pytest.approx(ann.score(PROMPTS, RESPONSES)[0], abs=1e-6)


# ----------------------------------------------------------------------------- (d) encoders keep their own layout

def test_encoder_annotator_says_it_is_not_hf_loadable_and_round_trips(tiny_encoder, tmp_path):
    from cwpo_ray.reward_models import load_sequence_classifier

    torch.manual_seed(13)
    ann = new_annotator(ModelSource(str(tiny_encoder)), max_length=32)
    with torch.no_grad():
        ann.model.head.bias.fill_(0.25)
    before, _ = ann.score(PROMPTS, RESPONSES)
    folder = save_annotator(ann, tmp_path / "ann")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["hf_sequence_classification"] is False and "encoder" in meta["hf_note"]
    assert meta["pooling"] == "first" and "first token" in meta["text_format"]["score"]
    assert meta["text_format"]["special_tokens_before"] and meta["text_format"]["special_tokens_after"]  # [CLS] [SEP]
    assert (folder / HEAD_FILE).is_file()
    assert load_annotator(folder).score(PROMPTS, RESPONSES)[0] == before
    with pytest.raises(ValueError, match="at random"):  # transformers alone cannot score it, and says so here
        load_sequence_classifier(str(folder))


def test_a_decoder_with_mean_pooling_keeps_the_own_layout(tiny_decoder, tmp_path):
    ann = new_annotator(ModelSource(str(tiny_decoder)), pooling="mean", max_length=32)
    assert isinstance(ann.model, RewardModel) and "pooling 'mean'" in ann.meta.hf_note
    before, _ = ann.score(PROMPTS, RESPONSES)
    folder = save_annotator(ann, tmp_path / "ann")
    assert json.loads((folder / META_FILE).read_text())["hf_sequence_classification"] is False
    assert load_annotator(folder).score(PROMPTS, RESPONSES)[0] == before


# ----------------------------------------------------------------------------- generation engines

def test_generator_lifecycle_releases_the_model(tiny_decoder):
    from cwpo_ray.generation import GenSettings, open_generator

    s = GenSettings(engine="transformers", max_new_tokens=4, batch_size=2, temperature=0.0)
    with open_generator(str(tiny_decoder), s) as gen:
        out = gen.generate(["Tell me about rain.", "hi", "Tell me about cats."], s)
        alive = weakref.ref(gen.model)
    assert len(out) == 3 and all(len(r) == 1 for r in out)
    assert gen.model is None and alive() is None  # released on exit, not at some later collection

    with pytest.raises(RuntimeError, match="boom"):
        with open_generator(str(tiny_decoder), s) as gen:
            alive = weakref.ref(gen.model)
            raise RuntimeError("boom")
    assert alive() is None  # released on errors too


def test_generate_releases_each_model_before_the_next(tiny_decoder, decoders):
    """evaluate's pattern: the policy, then the reference, in one process; no engine outlives its call."""
    from transformers import PreTrainedModel

    from cwpo_ray.generation import GenSettings, generate

    def live_causal_lms() -> int:
        gc.collect()
        # type(), not isinstance(): the latter touches deprecated torch objects on the heap (a FutureWarning)
        return sum(1 for o in gc.get_objects()
                   if type(o).__name__.endswith("CausalLM") and issubclass(type(o), PreTrainedModel))

    s = GenSettings(engine="transformers", max_new_tokens=4, batch_size=2, temperature=0.0)
    start = live_causal_lms()
    first = generate(str(tiny_decoder), ["Tell me about rain."], s)
    assert live_causal_lms() == start
    second = generate(str(decoders["opt"]), ["Tell me about rain."], s)
    assert live_causal_lms() == start
    assert len(first) == len(second) == 1
