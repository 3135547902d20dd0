"""Policy training: tokenization and log-prob mechanics, weighted PO steps, and the Ray Train recipe.

The recipe tests share one tiny preference task and run 2 short Ray Train runs in all:
SFT + PO under DDP (learning), and the same PO under DeepSpeed ZeRO-3 with optimizer offload,
gradient accumulation and a killed worker (resumes at the saved step, DDP's loss curve). LoRA's
merged save is checked in process.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from cwpo_ray import logprobs, weighting
from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer
from conftest import free_port

REPO = Path(__file__).resolve().parent.parent

# DDP and DeepSpeed ZeRO both run in fp32 on CPU; they differ only in reduction order.
CURVE_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_decoder):
    source = ModelSource(str(tiny_decoder))
    return load_tokenizer(source), source


def fresh_model(source, seed: int = 0):
    torch.manual_seed(seed)
    return load_causal_lm(source)


def batch_of(tokenizer, rows, lengths=logprobs.Lengths(8, 24)):
    return logprobs.pair_batch(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                             [r["rejected"] for r in rows], lengths)


def reference(model, batch):
    with torch.no_grad():
        logps, _ = logprobs.sequence_logps(model, batch)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


# ----------------------------------------------------------------------------- mechanics

def test_truncation_cuts_prompt_left_and_response_right():
    lengths = logprobs.Lengths(max_prompt_length=3, max_length=6)
    prompt, response = logprobs.truncate([1, 2, 3, 4, 5], [10, 11, 12, 13, 14], lengths)
    assert prompt == [3, 4, 5] and response == [10, 11, 12]
    # a response always keeps at least one token
    assert logprobs.truncate([1, 2, 3], [10, 11], logprobs.Lengths(3, 4)) == ([1, 2, 3], [10])
    with pytest.raises(ValueError):
        logprobs.Lengths(max_prompt_length=8, max_length=8)


def test_sequence_logps_sum_response_tokens_only(tiny):
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    model = fresh_model(source)
    rows = synthetic_pairs(3)
    batch = logprobs.sft_batch(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows], logprobs.Lengths(8, 24))
    logps, counts = logprobs.sequence_logps(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    for i in range(batch["input_ids"].shape[0]):
        positions = [t for t in range(1, batch["input_ids"].shape[1]) if batch["response_mask"][i, t]]
        expected = sum(full[i, t - 1, batch["input_ids"][i, t]].item() for t in positions)
        assert logps[i].item() == pytest.approx(expected, abs=1e-4)
        assert counts[i].item() == len(positions)
    # the EOS token is part of each response
    assert int(batch["response_mask"].sum()) == int(counts.sum())
    assert all(int(batch["input_ids"][i, batch["attention_mask"][i].sum() - 1]) == tokenizer.eos_token_id
               for i in range(3))


def test_label_logps_equal_log_softmax_in_value_and_gradient():
    """The written-out backward against autograd's log_softmax, with rows read twice (a prompt's last
    token predicts the first token of both responses) and rows not read at all."""
    torch.manual_seed(0)
    logits = (4 * torch.randn(6, 50, dtype=torch.float64)).requires_grad_()
    rows, labels = torch.tensor([0, 2, 2, 3, 5, 0]), torch.tensor([7, 1, 49, 1, 0, 7])
    weights = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    got = logprobs.label_logps(logits, rows, labels)
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    expected = logits.log_softmax(-1)[rows, labels]
    (expected * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: logprobs.label_logps(x, rows, labels), (logits.detach().requires_grad_(),))


def test_lm_head_runs_only_where_a_response_token_is_predicted(tiny):
    """Packed rows put later segments' prompts between responses: the LM head (a vocabulary-wide
    matmul) sees only the positions that predict a response token, and a model without
    ``logits_to_keep`` gives the same log-probs."""
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    model = fresh_model(source)
    batch = batch_of(tokenizer, synthetic_pairs(6, seed=2))
    reads = {(int(batch["seq_rows"][s]), int(p)) for s in range(batch["labels"].shape[0])
             for p, real in zip(batch["pred_positions"][s], batch["label_mask"][s]) if real}
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    logps, counts = logprobs.sequence_logps(model, batch)
    assert seen == [len(reads)] and len(reads) < batch["input_ids"].numel()

    class NoLogitsToKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    plain, plain_counts = logprobs.sequence_logps(NoLogitsToKeep(model), batch)
    assert seen[-1] == batch["input_ids"].numel()  # every position: the fallback slices afterwards
    torch.testing.assert_close(plain, logps)
    assert torch.equal(plain_counts, counts)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
def test_packed_pair_scores_each_response_as_its_own_sequence(tiny, attention, pack):
    """prompt | chosen | rejected in one row (pack=False), and several pairs per row with a shared
    prompt computed once (pack=True), give the log-probs and gradients of separate sequences
    (responses of different lengths, one truncated, padding in the batch)."""
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    rows = synthetic_pairs(7, seed=7)
    rows[1]["chosen"] += " and then some more words that will not fit"
    rows[2]["rejected"] = "no"
    for i, j in ((4, 0), (5, 0), (6, 3)):  # pairs 0, 4, 5 share a prompt, and 3, 6
        rows[i]["prompt"] = rows[j]["prompt"]
    lengths = logprobs.Lengths(8, 24)
    prompts = [r["prompt"] for r in rows]
    n = len(rows)

    def scored(packed: bool):
        model = fresh_model(source)
        model.config._attn_implementation = attention
        if packed:
            batch = logprobs.pair_batch(tokenizer, prompts, [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                                        lengths, pack=pack)
            logps, counts = logprobs.sequence_logps(model, batch)
        else:
            c, nc = logprobs.sequence_logps(model, logprobs.sft_batch(tokenizer, prompts, [r["chosen"] for r in rows],
                                                                      lengths))
            r, nr = logprobs.sequence_logps(model, logprobs.sft_batch(tokenizer, prompts, [r["rejected"] for r in rows],
                                                                      lengths))
            logps, counts = torch.cat([c, r]), torch.cat([nc, nr])
        (logps * torch.linspace(0.5, 2.0, 2 * n)).sum().backward()  # a loss that weighs every sequence differently
        return logps.detach(), counts, [p.grad for p in model.parameters()]

    packed, separate = scored(True), scored(False)
    torch.testing.assert_close(packed[0], separate[0], rtol=1e-5, atol=1e-4)
    prompt_tokens = len(tokenizer(rows[1]["prompt"])["input_ids"])
    assert torch.equal(packed[1], separate[1]) and int(packed[1][1]) + prompt_tokens == 24  # cut to max_length
    for a, b in zip(packed[2], separate[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packing_computes_each_shared_prompt_once_in_fewer_rows(tiny):
    """What packing saves, on a batch whose pairs repeat prompts: every distinct prompt goes in once,
    rows hold several pairs, and fewer tokens are computed than one padded row per pair."""
    from tiny_models import synthetic_pairs

    tokenizer, _ = tiny
    rows = synthetic_pairs(8, seed=3)
    for i in (1, 2, 5):
        rows[i]["prompt"] = rows[0]["prompt"]
    args = ([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
            logprobs.Lengths(8, 24))
    packed, plain = logprobs.pair_batch(tokenizer, *args), logprobs.pair_batch(tokenizer, *args, pack=False)
    prompt = tokenizer(rows[0]["prompt"])["input_ids"]

    def starts(batch):  # (row, position) where a segment's prompt starts: position id 0
        return int((batch["position_ids"] == 0).logical_and(batch["input_ids"] == prompt[0]).sum())

    assert plain["input_ids"].shape[0] == 8 and packed["input_ids"].shape[0] < 8
    assert packed["input_ids"].numel() <= plain["input_ids"].numel()
    assert starts(packed) < starts(plain)
    assert packed["seq_rows"].unique().numel() == packed["input_ids"].shape[0]  # no empty row
    assert torch.equal(packed["seq_rows"][:8], packed["seq_rows"][8:])  # a pair's responses share a row


def test_zero_weight_pair_leaves_parameters_unchanged(tiny):
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    model = fresh_model(source)
    rows = synthetic_pairs(2, seed=3)
    batch = batch_of(tokenizer, rows[:1])
    ref_c, ref_r = reference(fresh_model(source, seed=1), batch)  # a reference that differs from the policy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss, _ = logprobs.po_loss(model, batch, ref_c, ref_r, [0.0], loss_type="dpo", beta=0.5)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_weight_pair_adds_nothing_to_the_gradient(tiny):
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    rows = synthetic_pairs(2, seed=4)
    ref_model = fresh_model(source, seed=1)

    def grads(batch_rows, weights):
        model = fresh_model(source)
        batch = batch_of(tokenizer, batch_rows)
        ref_c, ref_r = reference(ref_model, batch)
        loss, _ = logprobs.po_loss(model, batch, ref_c, ref_r, weights, loss_type="rdpo", beta=0.5)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    alone = grads(rows[:1], [1.0])
    mixed = grads(rows, [1.0, 0.0])  # mean over 2 pairs: half the first pair's gradient
    for a, m in zip(alone, mixed):
        torch.testing.assert_close(m, a / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "rdpo"])
def test_weights_of_one_equal_the_unweighted_loss(tiny, loss_type):
    from tiny_models import synthetic_pairs

    tokenizer, source = tiny
    model = fresh_model(source)
    batch = batch_of(tokenizer, synthetic_pairs(4, seed=5))
    ref_c, ref_r = reference(fresh_model(source, seed=1), batch)
    weighted, metrics = logprobs.po_loss(model, batch, ref_c, ref_r, [1.0] * 4, loss_type=loss_type, beta=0.5)
    assert metrics["loss"] == pytest.approx(metrics["loss_unweighted"], rel=1e-6)
    if loss_type == "dpo":  # plain DPO written out, as TRL computes it (sigmoid loss)
        logps, _ = logprobs.sequence_logps(model, batch)
        plain = -F.logsigmoid(0.5 * ((logps[:4] - ref_c) - (logps[4:] - ref_r))).mean()
        assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)
    # and a confidence weighting is exactly mean(C * per-pair loss)
    w = [0.1, 0.9, 0.5, 0.0]
    cw, cw_metrics = logprobs.po_loss(model, batch, ref_c, ref_r, w, loss_type=loss_type, beta=0.5)
    _, per_pair = _per_pair(model, batch, ref_c, ref_r, loss_type)
    assert cw.item() == pytest.approx(float((torch.tensor(w) * per_pair.detach()).mean()), rel=1e-5)
    assert cw_metrics["confidence/mean"] == pytest.approx(0.375)


def _per_pair(model, batch, ref_c, ref_r, loss_type):
    from cwpo_ray.losses import preference_loss

    logps, counts = logprobs.sequence_logps(model, batch)
    n = logps.shape[0] // 2
    return preference_loss(logps[:n], logps[n:], ref_c, ref_r, loss_type=loss_type, beta=0.5,
                           chosen_lengths=counts[:n].float(), rejected_lengths=counts[n:].float())


def test_pair_weights():
    conf = [0.2, 0.9, 0.5, 0.9, 0.1]
    assert weighting.pair_weights(conf, "confidence", 5) == ([0, 1, 2, 3, 4], conf)
    assert weighting.pair_weights(conf, "none", 5) == ([0, 1, 2, 3, 4], [1.0] * 5)
    assert weighting.pair_weights(conf, "topk:0.4", 5) == ([1, 3], [1.0, 1.0])
    assert weighting.pair_weights(None, "confidence", 3) == ([0, 1, 2], [1.0] * 3)  # human labels
    for bad in ("topk:0", "topk:1.5", "conf"):
        with pytest.raises(ValueError):
            weighting.parse_weighting(bad)
    with pytest.raises(ValueError):
        weighting.pair_weights(None, "topk:0.3", 3)



def test_reference_pass_scores_each_response_once_across_runs(tiny, tmp_path):
    """The human / ws / cw arms score the same texts from the same start: the second run takes
    every response it shares with the first from the cache and computes only the new ones."""
    from tiny_models import synthetic_pairs

    from cwpo_ray.logprobs import Lengths
    from cwpo_ray.policy.reference import ReferenceSpec, ensure_reference

    tokenizer, source = tiny
    rows = synthetic_pairs(10, seed=3)
    rows[2]["chosen"] += " Very much so, and for a long time."  # lengths differ: batches are length-sorted
    columns = lambda rs: {k: [r[k] for r in rs] for k in ("id", "prompt", "chosen", "rejected")}  # noqa: E731
    def spec(table: str, key: str = "start") -> ReferenceSpec:
        return ReferenceSpec(str(tmp_path / table), Lengths(8, 24, False), 4, str(tmp_path / "cache"), key)

    def ensure(model, tokenizer, cols, spec, rank, world):  # the pass reads its pairs from a table, writes one
        pairs = tmp_path / ("pairs-" + spec.table.rsplit("/", 1)[-1])
        pq.write_table(pa.table(cols), pairs)
        ensure_reference(model, tokenizer, str(pairs), spec, rank, world)
        return pq.read_table(spec.table).to_pydict()

    model = fresh_model(source)
    first = ensure(model, tokenizer, columns(rows), spec("1.parquet"), 0, 1)
    ref_c, ref_r = reference(model, batch_of(tokenizer, rows))
    assert first["ref_chosen_logps"] == pytest.approx(ref_c.tolist(), abs=1e-4)
    assert first["ref_rejected_logps"] == pytest.approx(ref_r.tolist(), abs=1e-4)

    # Another arm: the labels of pairs 0-4 flipped, plus one new pair; scored by a changed model,
    # so a value that was recomputed instead of taken from the cache would differ.
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i < 5 else r for i, r in enumerate(rows)]
    new = synthetic_pairs(1, seed=99)
    changed = fresh_model(source)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = ensure(changed, tokenizer, columns(swapped + new), spec("2.parquet"), 0, 1)
    for i in range(10):
        c, r = (first["ref_rejected_logps"][i], first["ref_chosen_logps"][i]) if i < 5 else \
            (first["ref_chosen_logps"][i], first["ref_rejected_logps"][i])
        assert (second["ref_chosen_logps"][i], second["ref_rejected_logps"][i]) == (c, r)
    new_c, new_r = reference(changed, batch_of(tokenizer, new))
    assert second["ref_chosen_logps"][10] == pytest.approx(float(new_c[0]), abs=1e-4)
    assert second["ref_chosen_logps"][10] != pytest.approx(float(reference(model, batch_of(tokenizer, new))[0][0]),
                                                           abs=1e-3)
    assert pq.read_table(tmp_path / "2.parquet").num_rows == 11

    # Another start model (key) shares nothing.
    third = ensure(changed, tokenizer, columns(rows), spec("3.parquet", "other"), 0, 1)
    assert third["ref_chosen_logps"][0] != pytest.approx(first["ref_chosen_logps"][0], abs=1e-3)

# ----------------------------------------------------------------------------- streaming data

def _confidence_table(path, confidences):
    rows = [{"id": f"p{i}", "prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}", "confidence": c}
            for i, c in enumerate(confidences)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several input batches
    return rows


@pytest.mark.parametrize("spec", ["topk:0.3", "topk:0.05", "topk:1", "confidence", "none"])
def test_streamed_train_pairs_keep_what_pair_weights_keeps(tmp_path, spec):
    """write_train_pairs streams the table (top-k by a histogram threshold, ties by row order)
    and keeps exactly the rows and weights of the in-memory ``pair_weights``, ties included."""
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy
    from cwpo_ray.policy.train_table import write_train_pairs
    from cwpo_ray.rowstore import topk_keep, topk_selection

    rng = random.Random(1)
    conf = [rng.choice([0.5, 0.75, 0.75, 0.9, 1.0, 0.0, rng.random()]) for _ in range(60)]
    rows = _confidence_table(tmp_path / "pairs.parquet", conf)
    cfg = load_config(train_policy.Config, flags=dict(data=str(tmp_path / "pairs.parquet"), out=str(tmp_path / "o"),
                                                      weighting=spec, batch_size=1, num_workers=1))
    n = write_train_pairs(cfg, tmp_path / "train_pairs.parquet")
    keep, weights = weighting.pair_weights(conf, spec, len(conf))
    written = pq.read_table(tmp_path / "train_pairs.parquet").to_pydict()
    assert n == len(keep) and written["id"] == [rows[i]["id"] for i in keep] and written["weight"] == weights
    # the selection alone, on many random columns with ties, in batches of any size
    for trial in range(200):
        values = np.array([rng.choice([0.0, 0.2, 0.2, 0.6, 1.0, rng.random()]) for _ in range(rng.randint(1, 40))])
        k, size = rng.randint(1, len(values)), rng.randint(1, 9)
        threshold, ties = topk_selection(lambda: (values[i:i + size] for i in range(0, len(values), size)), k)
        kept = []
        for i in range(0, len(values), size):
            mask, ties = topk_keep(values[i:i + size], threshold, ties)
            kept += (np.flatnonzero(mask) + i).tolist()
        assert kept == sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def test_confidence_raw_weighting_reads_the_uncalibrated_column(tmp_path):
    """The cw_raw arm: weights are the annotated table's confidence_raw, not its calibrated confidence."""
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy
    from cwpo_ray.policy.train_table import write_train_pairs

    rows = [{"id": f"p{i}", "prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}", "confidence": 0.9,
             "confidence_raw": i / 10} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    for spec, want in (("confidence", [0.9] * 8), ("confidence_raw", [i / 10 for i in range(8)])):
        cfg = load_config(train_policy.Config, flags=dict(data=str(tmp_path / "pairs.parquet"), out=str(tmp_path / "o"),
                                                          weighting=spec, batch_size=1, num_workers=1))
        write_train_pairs(cfg, tmp_path / f"{spec}.parquet")
        assert pq.read_table(tmp_path / f"{spec}.parquet").column("weight").to_pylist() == pytest.approx(want)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "confidence_raw"} for r in rows]),
                   tmp_path / "old.parquet")
    cfg = load_config(train_policy.Config, flags=dict(data=str(tmp_path / "old.parquet"), out=str(tmp_path / "o"),
                                                      weighting="confidence_raw", batch_size=1, num_workers=1))
    with pytest.raises(ValueError, match="needs a confidence_raw column"):
        write_train_pairs(cfg, tmp_path / "x.parquet")


def test_streamed_train_pairs_reject_bad_confidence_and_publish_nothing(tmp_path):
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy
    from cwpo_ray.policy.train_table import write_train_pairs

    _confidence_table(tmp_path / "pairs.parquet", [0.5] * 20 + [1.5])
    cfg = load_config(train_policy.Config, flags=dict(data=str(tmp_path / "pairs.parquet"), out=str(tmp_path / "o"),
                                                      weighting="confidence", batch_size=1, num_workers=1))
    with pytest.raises(ValueError, match="confidence must be in"):
        write_train_pairs(cfg, tmp_path / "train_pairs.parquet")
    assert not list(tmp_path.glob("*train_pairs*"))  # no partial table, no temporary left


def test_step_plan_is_one_seeded_permutation_per_epoch_at_every_table_size():
    """One order for every table size (the Feistel permutation, computed per step): each epoch visits
    distinct rows, its own order per epoch and per seed; a table of 2^17 rows costs no more than 100."""
    from cwpo_ray.step_plan import StepPlan

    for n in (100, (1 << 17) + 3):
        plan = StepPlan(n=n, batch_size=4, world=2, epochs=2, seed=3)
        epoch0 = [r for step in range(3) for rank in (0, 1) for r in plan.rows(step, rank)[0]]
        assert len(set(epoch0)) == len(epoch0) == 24 and all(0 <= r < n for r in epoch0)
        epoch1 = [r for rank in (0, 1) for r in plan.rows(plan.steps_per_epoch, rank)[0]]
        assert epoch1 != epoch0[:8]
        assert StepPlan(n=n, batch_size=4, world=2, epochs=2, seed=4).rows(0, 0) != plan.rows(0, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepPlan(n=5, batch_size=4, world=2, epochs=1, seed=0).rows(0, 0)


def test_step_plan_rows_read_by_index_are_the_plans_rows(tmp_path):
    """Every epoch is a permutation (each row once, the remainder dropped), the same for a fresh
    plan (a resumed run), another per epoch; the batch reader returns exactly those rows."""
    from cwpo_ray.policy.train_table import BatchReader
    from cwpo_ray.step_plan import StepPlan
    from cwpo_ray.rowstore import RowWriter

    n = 103
    with RowWriter(tmp_path / "t.parquet", pa.schema([("id", pa.string()), ("prompt", pa.string())]), group_rows=8) as w:
        for lo in range(0, n, 10):  # batches that straddle the row groups
            w.write(pa.table({"id": [f"r{i}" for i in range(lo, min(n, lo + 10))],
                              "prompt": [f"p{i}" for i in range(lo, min(n, lo + 10))]}))
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.num_row_groups == 13
    plan = StepPlan(n, batch_size=3, world=2, epochs=2, seed=5, accumulation=2)
    assert plan.steps_per_epoch == 8
    reader = BatchReader(str(tmp_path / "t.parquet"))
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * 8, (epoch + 1) * 8):
            for rank in range(2):
                micro = plan.rows(step, rank)
                assert [len(m) for m in micro] == [3, 3]
                assert micro == StepPlan(n, 3, 2, 2, 5, None, 2).rows(step, rank)  # deterministic: a resume sees it
                for m in micro:
                    assert reader.take(m) == {"id": [f"r{i}" for i in m], "prompt": [f"p{i}" for i in m]}
                    seen += m
        assert len(seen) == len(set(seen)) == 96 and set(seen) <= set(range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert StepPlan(n, 3, 2, 2, 6, None, 2).rows(0, 0) != plan.rows(0, 0)  # the seed matters


def test_reference_table_joined_per_batch_equals_scoring_each_pair(tiny, tmp_path):
    """Two workers' parts (row groups alternating between them), some responses from the cache:
    the merged table read per micro-batch gives each pair's log-probs as scoring it directly."""
    from tiny_models import synthetic_pairs

    from cwpo_ray.policy.reference import ReferenceCache, ReferenceSpec, ensure_reference
    from cwpo_ray.policy.train_table import BatchReader
    from cwpo_ray.step_plan import StepPlan
    from cwpo_ray.rowstore import RowWriter

    tokenizer, source = tiny
    model = fresh_model(source)
    lengths = logprobs.Lengths(8, 24)
    rows = synthetic_pairs(23, seed=21)
    rows[4]["chosen"] += " and a much longer answer than the rest"
    schema = pa.schema([(c, pa.string()) for c in ("id", "prompt", "chosen", "rejected")] + [("weight", pa.float64())])
    with RowWriter(tmp_path / "pairs.parquet", schema, group_rows=4) as w:
        w.write(pa.Table.from_pylist([{**r, "weight": 1.0} for r in rows]))
    direct = logprobs.reference_logps(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                      [r["rejected"] for r in rows], lengths)
    cache = ReferenceCache(str(tmp_path / "cache"), "start")
    ReferenceCache.GROUP_ROWS, old_group = 3, ReferenceCache.GROUP_ROWS
    try:  # pairs 0-9 cached already, in two segments of several row groups, with their direct values
        for part in (range(0, 5), range(5, 10)):
            keys = [ReferenceCache.key(rows[i]["prompt"], rows[i][side]) for side in ("chosen", "rejected") for i in part]
            cache.add_segment(np.array(keys, dtype="S32"),
                              np.array([direct[f"ref_{s}_logps"][i] for s in ("chosen", "rejected") for i in part]),
                              np.array([direct[f"{s}_tokens"][i] for s in ("chosen", "rejected") for i in part]))
        assert len(cache.segments()) == 2
        found, _, _ = cache.lookup(np.array([ReferenceCache.key("nope", "none")] + keys, dtype="S32"))
        assert found.tolist() == [False] + [True] * 10
        spec = ReferenceSpec(str(tmp_path / "reference.parquet"), lengths, 3, str(tmp_path / "cache"), "start")
        for rank in (1, 0):  # rank 0 merges the parts once its own is written (no process group here)
            ensure_reference(model, tokenizer, str(tmp_path / "pairs.parquet"), spec, rank, 2)
    finally:
        ReferenceCache.GROUP_ROWS = old_group
    assert not (tmp_path / "reference").exists()  # the parts are gone once merged
    assert len(cache.segments()) == 4  # each worker added what it scored
    merged = pq.ParquetFile(tmp_path / "reference.parquet")
    assert [merged.metadata.row_group(g).num_rows for g in range(merged.metadata.num_row_groups)] == [4] * 5 + [3]
    reader = BatchReader(str(tmp_path / "pairs.parquet"), str(tmp_path / "reference.parquet"))
    plan = StepPlan(23, batch_size=5, world=2, epochs=1, seed=0)
    for step in range(plan.total_steps):
        for rank in range(2):
            for micro in plan.rows(step, rank):
                batch = reader.take(micro)
                assert batch["id"] == [rows[i]["id"] for i in micro]
                for key in ("ref_chosen_logps", "ref_rejected_logps"):
                    assert batch[key] == pytest.approx([direct[key][i] for i in micro], abs=1e-4)
                for key in ("chosen_tokens", "rejected_tokens"):
                    assert batch[key] == [direct[key][i] for i in micro]
    # a reference table of other pairs is refused, not silently misjoined
    pq.write_table(pa.Table.from_pylist([{**r, "weight": 1.0} for r in rows[::-1]], schema=schema),
                   tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="does not match"):
        BatchReader(str(tmp_path / "other.parquet"), str(tmp_path / "reference.parquet")).take([0])


def test_help_states_the_truncation_rule(capsys):
    from cwpo_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-policy", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "Truncation rule" in text and "--weighting" in text and "--sft-epochs" in text


# ----------------------------------------------------------------------------- the recipe on Ray

def _annotated_table(path, n: int = 32):
    from tiny_models import synthetic_pairs

    rng = random.Random(0)
    rows = synthetic_pairs(n, seed=11)
    for r in rows:  # the annotator is right, with varied confidence
        c = rng.uniform(0.2, 1.0)
        r.update(reward_chosen=math.atanh(c) * 2, reward_rejected=0.0, confidence=c, annotator="test")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def _run(data, model, out, **overrides):
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy

    flags = dict(data=str(data), model=str(model), out=str(out), loss="dpo", weighting="confidence",
                 batch_size=4, num_workers=2, cpus_per_worker=0.5, max_length=24, max_prompt_length=8,
                 lr=2e-3, sft_lr=2e-3, epochs=2, sft_epochs=1, checkpoint_every=2, max_failures=0,
                 progress=False, experiment="test-policy")
    flags.update(overrides)
    cfg = load_config(train_policy.Config, flags=flags)
    assert train_policy.run(cfg) == 0
    return (out / "mlflow_run_id").read_text().strip()


def _curve(uri, run_id, key="loss"):
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def _new_run(client) -> str:
    """A new run in the relay tests' experiment on the tests' MLflow server; its id."""
    experiment = client.get_experiment_by_name("test-relay") or client.get_experiment(
        client.create_experiment("test-relay"))
    return client.create_run(experiment.experiment_id).info.run_id


def test_rank_zeros_metrics_reach_mlflow_while_training_runs_once_each_across_reruns(mlflow_server, tmp_path,
                                                                                   capsys):
    """What rank 0 logs (``RankZeroLogger``, a JSON line per call) the driver relays to MLflow while the
    fit runs, with the worker's step and time; a rerun into the same folder does not log a line again;
    a line that does not parse is skipped and said, not fatal; a line still being written waits."""
    import time

    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking
    from cwpo_ray.distributed import RankZeroLogger

    client = MlflowClient(mlflow_server)
    run_id = _new_run(client)
    path = tmp_path / "metrics.jsonl"
    rank0 = RankZeroLogger(str(path))
    with tracking.relay_metrics(path, run_id, interval_s=0.2) as relay:
        rank0.log_metrics({"loss": 0.5, "lr": 1e-3}, step=1)
        deadline = time.monotonic() + 30
        while not client.get_metric_history(run_id, "loss") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _curve(mlflow_server, run_id) == [(1, 0.5)]  # logged while the body still runs
        rank0.log_metrics({"loss": 0.25}, step=2)
        with open(path, "a") as f:
            f.write('{"step": 3, "timest\n')  # a worker killed mid-line, then restarted
    assert _curve(mlflow_server, run_id) == [(1, 0.5), (2, 0.25)]  # the rest at the end
    assert relay.lines == 2 and relay.skipped == 1 and "does not parse" in capsys.readouterr().err
    written = json.loads(path.read_text().splitlines()[0])
    (logged,) = [m for m in client.get_metric_history(run_id, "lr")]
    assert logged.timestamp == written["timestamp"] and logged.step == 1

    with open(path, "a") as f:
        f.write('{"step": 4, "timestamp": 1, "metrics": {"loss": 0.1}}\n{"step": 5, "timesta')  # 5 unfinished
    with tracking.relay_metrics(path, run_id, interval_s=60) as rerun:  # a rerun of the driver
        pass
    assert _curve(mlflow_server, run_id) == [(1, 0.5), (2, 0.25), (4, 0.1)]
    assert (rerun.lines, rerun.skipped) == (1, 0)

    # Steps trained again after a resume from an earlier checkpoint (a lost node): the first value of
    # each step stays, the new steps after it are logged; a metric new at an old step is logged.
    with open(path, "a") as f:
        f.write('mp": 5, "metrics": {"loss": 0.05}}\n')  # step 5's line completed
        for step, loss in ((3, 0.3), (4, 0.11), (5, 0.051), (6, 0.04)):
            f.write(json.dumps({"step": step, "timestamp": 2, "metrics": {"loss": loss}}) + "\n")
        f.write(json.dumps({"step": 3, "timestamp": 2, "metrics": {"po/resumed_at_step": 3}}) + "\n")
    with tracking.relay_metrics(path, run_id, interval_s=60) as resumed:
        pass
    assert _curve(mlflow_server, run_id) == [(1, 0.5), (2, 0.25), (4, 0.1), (5, 0.05), (6, 0.04)]
    assert _curve(mlflow_server, run_id, "po/resumed_at_step") == [(3, 3.0)]
    assert resumed.retrained == 3

    assert RankZeroLogger("").path is None  # no file: logs nothing (as on ranks other than 0)


def test_the_metrics_relay_waits_out_a_tracking_error_and_says_so_once(mlflow_server, tmp_path, capsys):
    """The run refuses metrics for a while (deleted, then restored: an error from the real server at
    every tick meanwhile): the relay says so once, training is not stopped, and once the run takes
    metrics again every line is logged, once."""
    import time

    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking
    from cwpo_ray.distributed import RankZeroLogger

    client = MlflowClient(mlflow_server)
    run_id = _new_run(client)
    path = tmp_path / "metrics.jsonl"
    client.delete_run(run_id)
    with tracking.relay_metrics(path, run_id, interval_s=0.2):
        for step in (1, 2, 3):
            RankZeroLogger(str(path)).log_metrics({"loss": 1.0 / step}, step=step)
            time.sleep(0.5)  # two or three ticks each, all refused
        assert capsys.readouterr().err.count("metrics relay:") == 1
        client.restore_run(run_id)
    assert _curve(mlflow_server, run_id) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, mlflow_server, tiny_decoder, tmp_path_factory):
    """SFT then PO in one Ray Train run; the last worker is killed at PO's second step, when the
    latest checkpoint is SFT's (its step 4): the restarted group skips the saved SFT and starts PO over."""
    root = tmp_path_factory.mktemp("policy")
    _annotated_table(root / "pairs.parquet")
    out = root / "ddp"
    run_id = _run(root / "pairs.parquet", tiny_decoder, out, strategy="ddp", fail_at_step=1, max_failures=1,
                  keep_checkpoints=True)
    return root, out, run_id


def test_sft_and_po_share_one_ray_train_run_and_resume_by_phase(ddp_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    root, out, run_id = ddp_run
    assert (out / ".failed-at-1").exists()  # the failure did happen
    assert sorted(p.name for p in (out / "ray").iterdir() if p.is_dir()) == ["sft-po"]  # one Ray Train run
    client = MlflowClient(mlflow_server)
    # SFT ran and saved once, before the failure; the restart did not run it again
    assert [s for s, _ in _curve(mlflow_server, run_id, "sft/loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "sft/loop_seconds")) == 1
    # PO started over from step 0 (SFT's step-4 checkpoint is not PO's): step 1 trained twice, the same
    # value; MLflow keeps one value a step (the relay skips a step trained again)
    trained = _trained_losses(out)
    assert [s for s, _ in trained] == [1, 1] + list(range(2, 9))
    assert trained[0][1] == pytest.approx(trained[1][1], rel=1e-6)
    assert _curve(mlflow_server, run_id) == [trained[0]] + trained[2:]


def _trained_losses(out: Path) -> list[tuple[int, float]]:
    """(step, PO loss) of every step rank 0 trained, in order, a step trained again included."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(x["step"], x["metrics"]["loss"]) for x in rows if "loss" in x["metrics"]]


def _freed_memory_probe(config):
    """In a Ray Train worker: glibc's own account of the heap (mallinfo2, glibc >= 2.33) around a 64 MB
    block, as a step's activations, allocated and freed four times; and the MALLOC_* variables the
    process started with (what glibc read)."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    seq = []
    for _ in range(4):
        block = torch.ones(16 * 2**20)
        during = libc.mallinfo2()
        del block
        after = libc.mallinfo2()
        seq.append({"mapped_apart": during.hblkhd, "heap_during": during.arena, "heap_after": after.arena})
    started_with = sorted(v.decode() for v in open("/proc/self/environ", "rb").read().split(b"\0")
                          if v.startswith(b"MALLOC_"))
    Path(config["out"]).write_text(json.dumps({"seq": seq, "started_with": started_with}))


def test_cpu_workers_keep_freed_memory_instead_of_handing_it_back(ray_cluster, tmp_path):
    """A training step frees and reallocates the same activations and gradients: in a CPU worker a
    freed block stays in the process for the next step, instead of going back to the kernel to be
    faulted in again page by page. With glibc's defaults a 64 MB block is mapped apart and unmapped
    when freed (``mapped_apart`` 64 MB and more); here it comes from the heap, which freeing does not
    shrink. (Whether the next step's block lands in the freed space depends on what other threads
    allocated meanwhile, so page faults are not what is checked.)"""
    from cwpo_ray.distributed import DistributedConfig, run_trainer

    assert not any(k.startswith("MALLOC_") for k in os.environ)  # the driver's own values would win
    run_trainer(_freed_memory_probe, {"out": str(tmp_path / "probe.json")}, DistributedConfig(max_failures=0),
                "freed-memory-probe", str(tmp_path))
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["started_with"] == ["MALLOC_ARENA_MAX=1", "MALLOC_MMAP_MAX_=0", f"MALLOC_TRIM_THRESHOLD_={2**34}"]
    for step in probe["seq"]:
        assert step["mapped_apart"] == 0 and step["heap_during"] >= 2**26, probe
        assert step["heap_after"] == step["heap_during"], probe


def test_sft_then_cw_dpo_learns_the_preference(ddp_run, mlflow_server):
    from transformers import AutoModelForCausalLM

    from tiny_models import synthetic_pairs

    root, out, run_id = ddp_run
    tokenizer = load_tokenizer(ModelSource(str(out / "policy")))
    trained = AutoModelForCausalLM.from_pretrained(out / "policy")  # plain transformers, as saved
    start = AutoModelForCausalLM.from_pretrained(out / "sft")
    rows = synthetic_pairs(32, seed=11)
    batch = batch_of(tokenizer, rows)
    ref_c, ref_r = reference(start, batch)
    pol_c, pol_r = reference(trained, batch)
    margins = (pol_c - ref_c) - (pol_r - ref_r)
    accuracy = float((margins > 0).float().mean())
    assert accuracy >= 0.85, f"implicit-reward accuracy {accuracy} on the training pairs"
    # the stored reference log-probs are the SFT model's
    stored = pq.read_table(out / "reference.parquet").to_pydict()
    by_id = dict(zip(stored["id"], stored["ref_chosen_logps"]))
    assert [by_id[r["id"]] for r in rows] == pytest.approx(ref_c.tolist(), abs=1e-3)
    # TRL-named metrics went to MLflow, one point per step
    metrics = _curve(mlflow_server, run_id, "rewards/accuracies")
    assert sorted({s for s, _ in metrics}) == list(range(1, 9))  # step 1 twice: the fixture's restart
    assert _curve(mlflow_server, run_id, "sft/loss")
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(mlflow_server).get_run(run_id).data.metrics
    for key in ("loss", "loss_unweighted", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "confidence/mean", "pairs_per_s", "tokens_per_s"):
        assert key in logged


def _po_from_sft(root, ddp_out, name, **overrides):
    """The DDP run's PO stage again (same start, data and settings) under another strategy."""
    out = root / name
    out.mkdir()
    shutil.copy(ddp_out / "reference.parquet", out / "reference.parquet")  # the same reference (saves a pass)
    return out, _run(root / "pairs.parquet", ddp_out / "sft", out, sft_epochs=0, **overrides)


def test_zero3_offload_accumulation_resumes_after_a_killed_worker(ddp_run, mlflow_server):
    """The DDP run's PO again under DeepSpeed ZeRO-3 with the optimizer offloaded, 2 micro-batches of 2
    instead of one batch of 4 (the same global batch, hence the same updates), and the last worker's
    process killed at step 6: each worker holds ~half the weights from the load on (zero.Init), and the
    same loss curve, learning rates and final weights as DDP's. (ZeRO-2
    goes through the same engine wrapper; the annotator's k-fold test trains and restarts under it.)"""
    from transformers import AutoModelForCausalLM

    root, ddp_out, ddp_run_id = ddp_run
    out, run_id = _po_from_sft(root, ddp_out, "zero3-offload-failure", strategy="deepspeed", zero_stage=3,
                               offload_optimizer=True, batch_size=2, grad_accumulation=2,
                               fail_at_step=5, checkpoint_every=2, max_failures=1)
    assert (out / ".failed-at-5").exists()  # the failure did happen
    assert not (out / "ray").exists()  # the checkpoints went once the final model was saved (the default)
    curve, trained = _curve(mlflow_server, run_id), _trained_losses(out)
    print(f"reliability: train-policy ZeRO-3, worker killed at step 6, trained steps {[s for s, _ in trained]}, "
          f"logged {[s for s, _ in curve]}")
    # 32 pairs / global batch 8 = 4 steps an epoch, 2 epochs. The last worker dies at the start of step
    # 6 (index 5); the group restarts from the step-4 checkpoint, so step 5 is trained twice, then 6 ... 8;
    # MLflow has each step once
    assert [s for s, _ in trained] == [1, 2, 3, 4, 5, 5] + list(range(6, 9))
    assert [s for s, _ in curve] == list(range(1, 9))
    expected = dict(_curve(mlflow_server, ddp_run_id))
    assert list(expected) == list(range(1, 9)) and expected[8] < expected[1]
    # every step matches DDP's, after the restart too: the weights, AdamW moments and the LR schedule
    # all came back from the checkpoint (a fresh optimizer would change them)
    for step, value in trained:
        assert value == pytest.approx(expected[step], rel=CURVE_RTOL), step
    lr = dict(_curve(mlflow_server, run_id, "learning_rate"))
    assert lr == pytest.approx(dict(_curve(mlflow_server, ddp_run_id, "learning_rate")), rel=1e-9)
    # ZeRO-3 builds the model partitioned (zero.Init): a worker holds about half of the 2-worker model
    total = _curve(mlflow_server, run_id, "po/parameters")[0][1]
    held = _curve(mlflow_server, run_id, "po/parameters_on_rank0")[0][1]
    assert held <= 0.55 * total, (held, total)
    assert _curve(mlflow_server, ddp_run_id, "po/parameters_on_rank0")[0][1] == total  # DDP: whole
    # the saved model is whole and equals the DDP run's
    final = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(ddp_out / "policy").state_dict()
    for name, tensor in reference.items():
        assert torch.allclose(final[name], tensor, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("lora", [False, True])
def test_final_model_is_the_trained_module_and_loads_with_from_pretrained(tiny, tmp_path, lora):
    """The final save writes rank 0's trained module itself (LoRA merged in), not the start model
    reloaded: what from_pretrained reads back equals the trained weights, and differs from the start.
    With LoRA (peft's default targets for this model: q/v) only those matrices change and no adapter key is left.
    LoRA through Ray Train and DeepSpeed ZeRO-3 runs in the pipeline tests (the GPU preset's policy)."""
    import copy

    from transformers import AutoModelForCausalLM

    from cwpo_ray.config import load_config
    from cwpo_ray.distributed import DistributedConfig
    from cwpo_ray.engines import adamw, setup_engine
    from cwpo_ray.recipes import train_policy
    from cwpo_ray.policy import worker

    tokenizer, source = tiny
    cfg = load_config(train_policy.Config, flags=dict(data=str(tmp_path), model=source.path, out=str(tmp_path),
                                                       lora=lora, lora_r=4))
    job = worker.Job(cfg=cfg, mode="po", model_path=source.path, gguf_file=None, table="",
                           save_to=str(tmp_path / "policy"), lr=0.1, warmup_steps=0, plan=None,
                           metrics_file="", reference_table="")
    model = worker.with_lora(fresh_model(source), cfg)
    engine = setup_engine(model, adamw([p for p in model.parameters() if p.requires_grad], 0.1, 0.0), None,
                          DistributedConfig(), micro_batch_size=1)
    for _ in range(2):  # LoRA's B starts at zero: the second step moves the merged weights
        engine.backward_and_step(engine(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.pow(2).mean())
    trained = (copy.deepcopy(model).merge_and_unload() if lora else model).state_dict()
    trained = {k: v.clone() for k, v in trained.items()}

    worker.save_final_model(engine, tokenizer, source, job, rank=0)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    start = fresh_model(source).state_dict()
    assert set(saved) == set(trained) == set(start)
    for name, tensor in trained.items():
        assert torch.equal(saved[name], tensor), name
    changed = {name for name in start if not torch.equal(saved[name], start[name])}
    assert changed
    if lora:
        assert all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed
    assert load_tokenizer(ModelSource(str(tmp_path / "policy"))).get_vocab() == tokenizer.get_vocab()


def test_deepspeed_config_follows_the_resolved_mixed_precision():
    """What each placement asks DeepSpeed for (the GPU run itself needs a GPU; this machine has none):
    mixed_precision auto is fp32 on a CPU and bf16 on a GPU with bf16; fp16 turns on DeepSpeed's fp16."""
    from cwpo_ray.distributed import DistributedConfig
    from cwpo_ray.engines import deepspeed_config, resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("no", torch.device("cpu")) == "fp32" and resolve_precision("fp16", torch.device("cpu")) == "fp16"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-6, weight_decay=0.05)
    cpu = deepspeed_config(DistributedConfig(strategy="deepspeed", zero_stage=3, offload_optimizer=True), 4, 2, 1.0, opt,
                           "fp32")
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False}
    assert "optimizer" not in cpu  # our AdamW steps the CPU copy
    assert cpu["gradient_accumulation_steps"] == 2 and cpu["train_micro_batch_size_per_gpu"] == 4
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    gpu = deepspeed_config(DistributedConfig(strategy="deepspeed", zero_stage=3, offload_optimizer=True, use_gpu=True),
                           4, 1, 1.0, opt, "bf16")
    assert gpu["bf16"] == {"enabled": True} and gpu["fp16"] == {"enabled": False}
    assert deepspeed_config(DistributedConfig(strategy="deepspeed"), 4, 1, 1.0, opt, "fp16")["fp16"] == {"enabled": True}
    assert gpu["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-6, "weight_decay": 0.05, "betas": [0.9, 0.999],
                                                            "eps": 1e-8}}


DEEPSPEED_ENGINE_SCRIPT = """
import json, os
import torch, torch.distributed as dist
import deepspeed.ops
from cwpo_ray.distributed import DistributedConfig
from cwpo_ray.engines import SHM_COMM_OP, adamw, setup_engine

would_build = deepspeed.ops.__compatible_ops__[SHM_COMM_OP]
dist.init_process_group("gloo")  # as Ray Train's worker group does before the train loop
model = torch.nn.Linear(4, 1)
engine = setup_engine(model, adamw(list(model.parameters()), 0.1, 0.0), None,
                      DistributedConfig(strategy="deepspeed", zero_stage=2), micro_batch_size=2)
engine.backward_and_step(engine(torch.ones(2, 4)).pow(2).mean())
print(json.dumps({"would_build": would_build, "built": sorted(os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]))}))
"""


def test_deepspeed_engine_compiles_no_op_it_does_not_train_with(tmp_path):
    """DeepSpeed's comm set-up JIT-compiles a shared-memory all-reduce that only its inference uses
    (30-100 s on this machine, once per environment): the engine starts and steps without building it."""
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_ENGINE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["would_build"]:
        pytest.skip("DeepSpeed cannot build its shm op here (no compiler?): nothing to skip")
    assert result["built"] == [], result


def test_prompts_take_the_models_chat_format(tiny):
    """An instruct model is trained on the format `cwpo evaluate` generates in: the prompt tokens
    are those of the chat template (with its own special tokens), the response follows."""
    from cwpo_ray.generation import chat_texts

    tokenizer, _ = tiny
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}[user] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[bot] {% endif %}")
    prompts, responses = ["Tell me about cats."], ["cats are kind."]
    plain, plain_p = logprobs.encode_responses(tokenizer, prompts, responses, logprobs.Lengths(16, 48))
    chat, chat_p = logprobs.encode_responses(tokenizer, prompts, responses, logprobs.Lengths(16, 48, chat=True))
    expected = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"][0][-16:]
    assert chat[0][:chat_p[0]] == expected and chat_p[0] > plain_p[0]
    assert chat[0][chat_p[0]:] == plain[0][plain_p[0]:]  # the same response tokens (EOS included)
    tokenizer.chat_template = None  # a base model: chat=True changes nothing
    assert logprobs.encode_responses(tokenizer, prompts, responses, logprobs.Lengths(16, 48, chat=True)) == (plain, plain_p)


def test_own_trainable_weights_copies_trainable_tensors_with_equal_values(tiny_decoder):
    from cwpo_ray.models import ModelSource, load_causal_lm, own_trainable_weights

    model = load_causal_lm(ModelSource(str(tiny_decoder)))
    model.get_input_embeddings().weight.requires_grad_(False)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    own_trainable_weights(model)
    for n, p in model.named_parameters():
        ptr, value = before[n]
        assert torch.equal(p.detach(), value), n
        assert (p.data_ptr() != ptr) == p.requires_grad, n  # frozen weights stay where they are
