"""Tiny random-initialized models and tokenizers for tests, saved with save_pretrained.

They are loaded back through the same ``from_pretrained`` path as real models. The
synthetic preference task has a learnable signal: the chosen response uses words from
POSITIVE, the rejected one from NEGATIVE.
"""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ["great", "helpful", "kind", "clear", "wonderful", "honest", "useful", "bright", "happy", "good"]
NEGATIVE = ["awful", "rude", "useless", "vague", "terrible", "wrong", "boring", "sad", "bad", "harmful"]
TOPICS = ["cats", "rivers", "bread", "music", "trains", "gardens", "the moon", "chess", "rain", "books",
          "coffee", "maps", "bees", "winter", "paint", "boats"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Labeled pairs ``{id, prompt, chosen, rejected}`` where chosen is the positive-worded reply."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        pos = " ".join(rng.sample(POSITIVE, 3))
        neg = " ".join(rng.sample(NEGATIVE, 3))
        rows.append({
            "id": f"syn-{seed}-{i}",
            "prompt": f"Tell me about {topic}.",
            "chosen": f"{topic} are {pos}.",
            "rejected": f"{topic} are {neg}.",
        })
    return rows


def corpus() -> list[str]:
    lines = []
    for t in TOPICS:
        lines.append(f"Tell me about {t}. {t} are " + " ".join(POSITIVE) + ".")
        lines.append(f"Tell me about {t}. {t} are " + " ".join(NEGATIVE) + ".")
    lines += ["Human: hello Assistant: hi there", "SUBREDDIT: r/test TITLE: a POST: b TL;DR: c",
              "é ü 日本 emoji 🙂 unicode text", "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( )"]
    return lines * 5


def build_decoder_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_encoder_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=512, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus(), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def build_tiny_decoder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a 512-token BPE vocabulary (~60k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = build_decoder_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with a 512-token WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tok = build_encoder_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(folder)
    return folder
