"""What every trainer on GPUs needs, shown on CPU: mixed precision, no_sync on accumulation
micro-batches, gradient checkpointing and an attention layout fast kernels take (packing separate);
and a GGUF start trained to a saved folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cwpo_ray import logprobs
from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer

# 2 workers x 2 micro-batches x 2 rows: the global batch, 8 rows of a tiny regression.
ROWS, DIM = 8, 6


def _regression_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(ROWS, DIM, generator=g), torch.randn(ROWS, 1, generator=g)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _accumulated_step(config):
    """On each Ray Train worker: one optimizer step of 2 micro-batches (SGD, lr 1: the parameters move by
    exactly the gradient), counting the DDP all-reduces through a comm hook."""
    import ray.train
    import torch.distributed as td
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from cwpo_ray.distributed import DistributedConfig
    from cwpo_ray.engines import setup_engine

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    model = _mlp()
    engine = setup_engine(model, torch.optim.SGD(model.parameters(), lr=1.0), None, DistributedConfig(),
                          micro_batch_size=2, accumulation_steps=2, max_grad_norm=None)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(td.group.WORLD, bucket)

    engine.wrapped.register_comm_hook(None, counting_hook)
    x, y = _regression_batch()
    per_worker = ROWS // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    x, y = x[mine], y[mine]
    for k in range(2):
        micro = slice(k * 2, k * 2 + 2)
        loss = torch.nn.functional.mse_loss(engine(x[micro]), y[micro])
        engine.backward_and_step(loss)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"all_reduces": len(calls), "params": [
            p.detach().tolist() for p in model.parameters()]}))


def test_accumulated_step_on_two_workers_all_reduces_once_and_equals_one_step_on_the_whole_batch(
        ray_cluster, tmp_path):
    """DDP's no_sync on every micro-batch but the last: gradients are all-reduced once per optimizer
    step, and the update equals one step on the whole global batch (2 gloo workers x 2 micro-batches)."""
    from cwpo_ray.distributed import DistributedConfig, run_trainer

    run_trainer(_accumulated_step, {"out": str(tmp_path / "out.json")},
                DistributedConfig(num_workers=2, cpus_per_worker=0.5, max_failures=0), "no-sync", str(tmp_path))
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["all_reduces"] == 1  # one bucket, all-reduced once per step (twice without no_sync)

    model = _mlp()
    x, y = _regression_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad  # SGD, lr 1
    for expected, actual in zip(model.parameters(), got["params"]):
        torch.testing.assert_close(torch.tensor(actual), expected.detach(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tiny_decoder):
    source = ModelSource(str(tiny_decoder))
    return load_tokenizer(source), source


def _pairs(tokenizer, n=6, seed=2, packing="shared_prefix"):
    from tiny_models import synthetic_pairs

    rows = synthetic_pairs(n, seed=seed)
    return logprobs.pair_batch(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], logprobs.Lengths(8, 24), packing=packing)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_the_forward_in_half_and_keeps_fp32_weights(tiny, precision):
    """mixed_precision bf16 / fp16 under DDP: the forward's matmuls in half precision (autocast), the
    weights and AdamW's state in fp32; the loss near fp32's, and the first update close to fp32's.
    fp16 scales the loss: a step whose scaled gradients overflow is skipped and the scale lowered,
    so its first update comes a few steps later, from the same start."""
    from cwpo_ray.distributed import DistributedConfig
    from cwpo_ray.engines import adamw, setup_engine

    tokenizer, source = tiny
    batch = _pairs(tokenizer)
    results = {}
    for mode in ("no", precision):
        torch.manual_seed(0)
        model = load_causal_lm(source)
        start = copy.deepcopy(model.state_dict())
        engine = setup_engine(model, adamw(list(model.parameters()), 1e-3, 0.0), None,
                              DistributedConfig(mixed_precision=mode), micro_batch_size=6)
        dtype = engine(input_ids=batch["input_ids"][:, :4]).logits.dtype
        for attempt in range(40):
            logps, _ = logprobs.sequence_logps(engine, batch)
            loss = -logps.mean()
            engine.backward_and_step(loss)
            moved = {k: model.state_dict()[k] - start[k] for k in start}
            if any(v.abs().max() > 0 for v in moved.values()):
                break
        results[mode] = (dtype, float(loss.detach()), engine, moved, attempt)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert results["no"][0] == torch.float32 and results[precision][0] == half
    assert results["no"][4] == 0 and results[precision][4] < 39  # fp32 moved at once; mixed precision did move
    engine = results[precision][2]
    assert engine.precision == precision and (engine.scaler is not None) == (precision == "fp16")
    if precision == "fp16":
        assert engine.scaler.get_scale() < 2.0 ** 16  # overflowing steps lowered the scale
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert results[precision][1] == pytest.approx(results["no"][1], rel=2e-2)
    moved, reference = results[precision][3], results["no"][3]
    cosine = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in moved.values()]),
                                                   torch.cat([v.flatten() for v in reference.values()]), dim=0)
    assert cosine > 0.9, cosine


def test_gradient_checkpointing_gives_the_policys_gradients(tiny):
    """Activations recomputed in the backward (non-reentrant checkpointing): the same gradients of the
    packed pair log-probs, dropout included."""
    from cwpo_ray.models import enable_gradient_checkpointing

    tokenizer, source = tiny
    batch = _pairs(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm(source)
        model.config.attention_dropout = 0.1  # dropout active: checkpointing must replay its masks
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        torch.manual_seed(5)
        logps, _ = logprobs.sequence_logps(model, batch)
        logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_annotators_gradients(tiny_encoder):
    """The same for the annotator (encoder backbone + reward head), through the BT loss."""
    from cwpo_ray.annotator import collate, new_annotator
    from cwpo_ray.losses import bt_loss
    from cwpo_ray.models import enable_gradient_checkpointing
    from cwpo_ray.annotator_training.rounds import encode_pairs
    from tiny_models import synthetic_pairs

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        annotator = new_annotator(ModelSource(str(tiny_encoder)), max_length=32)
        if checkpointing:
            enable_gradient_checkpointing(annotator.model)
        chosen, rejected = encode_pairs(annotator.tokenizer, annotator.meta, synthetic_pairs(6, seed=1))
        annotator.model.train()
        torch.manual_seed(7)
        rewards = annotator.model(**collate(chosen + rejected, annotator.tokenizer.pad_token_id))
        bt_loss(rewards[:6], rewards[6:]).backward()
        grads.append({n: p.grad.clone() for n, p in annotator.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_separate_rows_score_pairs_as_the_shared_prefix_packing_does_on_smollm2():
    """packing separate (each sequence its own row, a 2D mask: what flash-attention takes) and
    shared_prefix (one row per prompt, a 4D mask) give the same summed log-probs on SmolLM2-135M."""
    from cwpo_ray.models import resolve_model
    from tiny_models import synthetic_pairs

    source = resolve_model("smollm2-135m")
    tokenizer, model = load_tokenizer(source), load_causal_lm(source).eval()
    rows = synthetic_pairs(4, seed=3) + [dict(synthetic_pairs(1, seed=3)[0], chosen="cats are great and kind.")]
    lengths = logprobs.Lengths(16, 48, chat=True)
    got = {}
    with torch.no_grad():
        for packing in logprobs.PACKINGS:
            batch = logprobs.pair_batch(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                        [r["rejected"] for r in rows], lengths, packing=packing)
            got[packing] = logprobs.sequence_logps(model, batch)
    assert got["separate"][0].shape == (2 * len(rows),)
    torch.testing.assert_close(got["separate"][0], got["shared_prefix"][0], rtol=1e-4, atol=0)
    assert torch.equal(got["separate"][1], got["shared_prefix"][1])  # the same tokens scored


def test_shared_prefix_packing_refuses_flash_attention():
    from cwpo_ray.config import ConfigError, load_config
    from cwpo_ray.recipes import train_policy

    with pytest.raises((ValueError, ConfigError), match="packing separate"):
        load_config(train_policy.Config, flags=dict(data=".", out="/tmp/x", packing="shared_prefix",
                                                    attn_implementation="flash_attention_2"))
    cfg = load_config(train_policy.Config, flags=dict(data=".", out="/tmp/x"))
    assert cfg.resolved_packing() == "shared_prefix"  # auto on CPU
    assert load_config(train_policy.Config, flags=dict(data=".", out="/tmp/x", use_gpu=True)).resolved_packing() \
        == "separate"


def _pairs_table(path, n=16):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny_models import synthetic_pairs

    rows = [dict(r, confidence=0.5 + 0.5 * (i % 2), reward_chosen=1.0, reward_rejected=0.0, annotator="t")
            for i, r in enumerate(synthetic_pairs(n, seed=4))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _train_policy(data, model, out, **overrides):
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy

    flags = dict(data=str(data), model=str(model), out=str(out), sft_epochs=0, epochs=1, batch_size=2,
                 num_workers=1, cpus_per_worker=1.0, max_length=32, max_prompt_length=16, checkpoint_every=100,
                 max_failures=2, progress=False, experiment="test-training-engine")
    flags.update(overrides)
    return train_policy.run(load_config(train_policy.Config, flags=flags))


def _loss_steps(uri, out):
    from mlflow.tracking import MlflowClient

    run_id = (out / "mlflow_run_id").read_text().strip()
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def test_train_policy_from_a_gguf_start_saves_a_folder_from_pretrained_loads(ray_cluster, mlflow_server, tmp_path):
    """`cwpo train-policy --model smollm2-135m` (a GGUF file, dequantized by transformers) trains and
    saves a plain folder; one step, trained once."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gguf"
    assert _train_policy(_pairs_table(tmp_path / "pairs.parquet"), "smollm2-135m", out, max_steps=1) == 0
    assert _loss_steps(mlflow_server, out) == [1]
    model = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert model.num_parameters() > 100e6 and getattr(model.config, "quantization_config", None) is None


def test_a_failed_final_save_is_not_retrained_and_a_rerun_saves_without_training(
        ray_cluster, mlflow_server, tiny_decoder, tmp_path):
    """The final save fails (a file where the model folder goes): Ray Train does not restart the
    workers to train again (max_failures 2); the command fails with the cause, and once it is
    removed the same command saves the trained state without a single step more."""
    data, out = _pairs_table(tmp_path / "pairs.parquet"), tmp_path / "run"
    out.mkdir()
    (out / "policy").write_text("in the way\n")
    with pytest.raises(RuntimeError, match="saving the model failed") as failure:
        _train_policy(data, tiny_decoder, out)
    assert "policy" in str(failure.value)
    assert _loss_steps(mlflow_server, out) == list(range(1, 9))  # each of the 8 steps once: no retry
    (out / "policy").unlink()
    assert _train_policy(data, tiny_decoder, out) == 0
    assert _loss_steps(mlflow_server, out) == list(range(1, 9))  # no step trained again
    assert (out / "policy" / "config.json").exists() and not (out / "save_error.txt").exists()


def test_the_engine_runs_cpu_built_batches_on_its_models_device():
    """Batches are built on the CPU; the engine puts them where the model is, as on a GPU worker
    (train-annotator's model once trained on the CPU with one GPU worker). The meta device stands in
    for the GPU here: it computes shapes only, and a CPU tensor reaching it would raise."""
    from cwpo_ray.engines import DDPEngine

    model = torch.nn.Linear(4, 2).to("meta")
    engine = DDPEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    assert engine(torch.ones(3, 4)).device.type == "meta"
    assert engine(input=torch.ones(3, 4)).device.type == "meta"
    with pytest.raises(Exception):
        model(torch.ones(3, 4))  # what the engine spares its callers
