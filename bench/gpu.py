"""What only a GPU can show: our training step, generation and annotator scoring on CUDA.

Two steps, because the GPU machine has no network and no room for the models' weights:

    python bench/gpu.py prepare --out .gpu/models     # here: configs + tokenizers (a few MB)
    python3 bench/gpu.py run --models .gpu/models --out results.json   # on the GPU machine

`run` builds SmolLM2-135M and all-MiniLM-L6-v2 from their configs with random weights (speed
does not depend on the values) and measures, through this package's own code:

1. the PO training step (``logprobs.pair_batch`` + ``logprobs.po_loss``, full fine-tuning, AdamW)
   through ``engines.DDPEngine`` (``strategy=ddp, use_gpu``) in fp32 and in bf16 (the GPU
   default, ``mixed_precision: auto``), with packing separate (flash-attention when installed), and
   with no_sync over 2 accumulation micro-batches plus gradient checkpointing; DeepSpeed ZeRO-2 / 0
   bf16 through ``engines.DeepSpeedEngine``; fp32 on the machine's CPU cores as the reference;
   plus the loss of one batch under bf16 vs fp32;
2. numerics: the same fp32 weights' log-probs on CUDA vs CPU (``logps_cuda_vs_cpu``); annotator
   labels and confidences bf16 vs fp32 (``annotator_bf16_vs_fp32``, ``annotate.precision``'s bar);
   the vLLM path of evaluation when vLLM is importable (``vllm_generation``: per-prompt seeds give
   the same texts twice, a second engine starts after the first is torn down);
3. generation (``generation.TransformersGenerator``): batch 1 vs batch 32;
4. annotator scoring (``Annotator.label_pairs``): batch 1 vs batch 32, the ceiling on what
   request batching in ``cwpo serve`` can buy (3x was the target; 1.22x is possible on 2 CPU cores).

Ray is not needed (world size 1) and nothing reaches the network; DeepSpeed must be importable. The
whole run takes a few minutes on one H100 (each part prints its seconds). Each part records an error
instead of stopping the others. Figures go to stdout and to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(out: Path) -> None:
    """Save the two models' configs and tokenizers (not their weights) where `run` will read them."""
    from transformers import AutoConfig

    from cwpo_ray.models import load_tokenizer, resolve_model

    for name in ("smollm2-135m", "minilm-l6"):
        source = resolve_model(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        AutoConfig.from_pretrained(source.path, **source.kwargs()).save_pretrained(folder)
        load_tokenizer(source).save_pretrained(folder)
        print(f"saved {name} config + tokenizer to {folder}")


def _random_model(config_folder: Path, kind: str, dest: Path) -> Path:
    """A folder with the config's model, randomly initialised, that our loaders read like any other."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_folder)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    cls.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(config_folder).save_pretrained(dest)
    return dest


def _pairs(n: int):
    """Prompts and response pairs from the shipped benchmark, repeated to n."""
    from cwpo_ray.tables import read_table

    rows = read_table(str(Path(__file__).resolve().parents[1] / "cwpo_ray/benchmark_data/pairs.parquet")).to_pydict()
    take = lambda col: [rows[col][i % len(rows[col])] for i in range(n)]  # noqa: E731
    return take("prompt"), take("response_a"), take("response_b")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step_rate(model_dir: Path, device: str, batch: int, steps: int, engine: str, zero_stage: int = 2,
                    precision: str = "no", accumulation: int = 1, checkpointing: bool = False,
                    packing: str = "shared_prefix", attention: str = "sdpa") -> dict:
    """Pairs/s of our PO step (DPO, beta 0.5, lengths of the `full` preset) after one warm-up step.

    ``engine`` "ddp": ``engines.DDPEngine`` around a one-process DistributedDataParallel (so its
    no_sync on accumulation micro-batches and its all-reduce run as on a cluster), in ``precision``
    with ``accumulation`` micro-batches of ``batch`` pairs per step; "deepspeed": DeepSpeedEngine.
    """
    import torch

    from cwpo_ray import logprobs
    from cwpo_ray.distributed import DistributedConfig
    from cwpo_ray.engines import DDPEngine, DeepSpeedEngine, adamw, resolve_precision
    from cwpo_ray.models import ModelSource, enable_gradient_checkpointing, load_causal_lm, load_tokenizer

    source = ModelSource(str(model_dir))
    tok = load_tokenizer(source)
    model = load_causal_lm(source, attn_implementation=attention)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = model.to(device)
    lengths = logprobs.Lengths(48, 96, True)
    prompts, a, b = _pairs(batch * accumulation * (steps + 1))
    ref = [-60.0] * batch
    weights = [0.8] * batch
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], 1e-6, 0.0)
    precision = resolve_precision(precision, torch.device(device))
    if engine == "deepspeed":
        runner = DeepSpeedEngine(model, optimizer, None, DistributedConfig(
            num_workers=1, strategy="deepspeed", zero_stage=zero_stage, use_gpu=True), micro_batch_size=batch,
            accumulation_steps=accumulation, precision=precision)
    else:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device == "cuda" else "gloo")
        runner = DDPEngine(model, optimizer, None, accumulation, 1.0, precision)
        runner.wrapped = torch.nn.parallel.DistributedDataParallel(model)  # what Ray Train's prepare_model makes
    model.train()
    losses, times = [], []
    for k in range(steps + 1):
        _sync()
        t0 = time.perf_counter()
        for m in range(accumulation):
            sl = slice((k * accumulation + m) * batch, (k * accumulation + m + 1) * batch)
            pb = logprobs.pair_batch(tok, prompts[sl], a[sl], b[sl], lengths, packing=packing)
            loss, _ = logprobs.po_loss(runner, pb, ref, ref, weights, loss_type="dpo", beta=0.5)
            runner.backward_and_step(loss)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = times[1:]  # the first step pays for allocation / kernel selection
    return {"engine": engine, "zero_stage": zero_stage if engine == "deepspeed" else None, "device": device,
            "precision": precision, "batch": batch, "accumulation": accumulation, "checkpointing": checkpointing,
            "packing": packing, "attention": attention, "steps": steps,
            "pairs_per_s": batch * accumulation * len(timed) / sum(timed),
            "s_per_step": sum(timed) / len(timed), "s_per_step_median": sorted(timed)[len(timed) // 2],
            "first_loss": losses[0], "peak_gpu_mib": _peak_mib() if device != "cpu" else None}


def loss_agreement(model_dir: Path, batch: int = 16) -> dict:
    """The DPO loss and sequence log-probs of one batch: bf16 (DeepSpeed's) vs fp32 forward."""
    import torch

    from cwpo_ray import logprobs
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer

    source = ModelSource(str(model_dir))
    tok = load_tokenizer(source)
    prompts, a, b = _pairs(batch)
    pb = logprobs.pair_batch(tok, prompts, a, b, logprobs.Lengths(48, 96, True))
    out, ref = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        model = load_causal_lm(source).to("cuda", dtype=dtype).eval()
        with torch.no_grad():
            logps, _ = logprobs.sequence_logps(model, pb)
            if ref is None:  # fp32 references for both: the bf16 loss then carries the bf16 log-prob error
                ref = (logps[:batch] - 1.0).tolist(), (logps[batch:] + 1.0).tolist()  # a margin of 2 nats
            loss, _ = logprobs.po_loss(model, pb, ref[0], ref[1], [1.0] * batch, loss_type="dpo", beta=0.5)
        out[str(dtype).split(".")[-1]] = {"logps": logps.float().cpu(), "loss": float(loss)}
    diff = (out["float32"]["logps"] - out["bfloat16"]["logps"]).abs()
    return {"batch": batch, "loss_fp32": out["float32"]["loss"], "loss_bf16": out["bfloat16"]["loss"],
            "logp_abs_diff_mean": float(diff.mean()), "logp_abs_diff_max": float(diff.max()),
            "logp_mean_fp32": float(out["float32"]["logps"].mean())}


def logps_cuda_vs_cpu(model_dir: Path, batch: int = 16) -> dict:
    """The same fp32 weights' summed response log-probs on the GPU and on the CPU (our scorer, the
    reference pass's and evaluation's): how far CUDA kernels move them."""
    import torch

    from cwpo_ray import logprobs
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer

    source = ModelSource(str(model_dir))
    tok = load_tokenizer(source)
    prompts, a, b = _pairs(batch)
    pb = logprobs.pair_batch(tok, prompts, a, b, logprobs.Lengths(48, 96, True), packing="separate")
    out = {}
    for device in ("cpu", "cuda"):
        model = load_causal_lm(source).to(device).eval()
        with torch.no_grad():
            out[device] = logprobs.sequence_logps(model, pb)[0].double().cpu()
    rel = ((out["cuda"] - out["cpu"]).abs() / out["cpu"].abs()).max()
    return {"batch": batch, "max_rel_diff": float(rel), "max_abs_diff": float((out["cuda"] - out["cpu"]).abs().max()),
            "logp_mean": float(out["cpu"].mean())}


def annotator_agreement(model_dir: Path, pairs_n: int = 2048) -> dict:
    """Annotator labels and confidences scored in bf16 vs fp32 on the GPU (``annotate.precision``'s
    bar: >= 99.5% of labels the same, confidences within 0.01), with a random head."""
    import torch

    from cwpo_ray.annotator import new_annotator
    from cwpo_ray.models import ModelSource

    torch.manual_seed(0)
    ann = new_annotator(ModelSource(str(model_dir)), max_length=128)
    ann.model.to("cuda").eval()
    prompts, a, b = _pairs(pairs_n)
    out = {}
    for precision in ("fp32", "bf16"):
        ann.precision = precision
        out[precision] = ann.label_pairs(prompts, a, b, batch_size=64)
    same = [x == y for x, y in zip(out["fp32"]["preferred"], out["bf16"]["preferred"])]
    dconf = [abs(x - y) for x, y in zip(out["fp32"]["confidence"], out["bf16"]["confidence"])]
    return {"pairs": pairs_n, "label_agreement": sum(same) / len(same), "max_conf_diff": max(dconf),
            "mean_conf_diff": sum(dconf) / len(dconf)}


def vllm_generation(model_dir: Path, prompts_n: int = 64) -> dict:
    """The vLLM path of `cwpo evaluate` (generation.VLLMGenerator): start, generate with per-prompt
    seeds twice (the same texts), tear down, start a second engine (the reference's)."""
    from cwpo_ray.generation import GenSettings, VLLMGenerator

    prompts, _, _ = _pairs(prompts_n)
    s = GenSettings(n=1, temperature=0.95, max_new_tokens=24, batch_size=64, seed=0)
    t0 = time.perf_counter()
    gen = VLLMGenerator(str(model_dir))
    first, second = gen.generate(prompts, s), gen.generate(prompts, s)
    gen.close()
    again = VLLMGenerator(str(model_dir))  # a second engine in the same process: the first freed its memory
    third = again.generate(prompts[:4], s)
    again.close()
    return {"prompts": prompts_n, "seconds": time.perf_counter() - t0, "same_with_same_seeds": first == second,
            "second_engine_ok": len(third) == 4, "example": first[0][0][:80]}


def generation_rate(model_dir: Path, batch: int, prompts_n: int) -> dict:
    from cwpo_ray.generation import GenSettings, TransformersGenerator

    gen = TransformersGenerator(str(model_dir))
    prompts, _, _ = _pairs(prompts_n)
    s = GenSettings(n=1, temperature=0.95, max_new_tokens=24, batch_size=batch)
    gen.generate(prompts[:batch], s)  # warm-up
    _sync()
    t0 = time.perf_counter()
    out = gen.generate(prompts, s)
    _sync()
    seconds = time.perf_counter() - t0
    return {"device": gen.device, "batch": batch, "prompts": prompts_n, "seconds": seconds,
            "prompts_per_s": prompts_n / seconds, "responses": sum(len(o) for o in out)}


def annotator_rate(model_dir: Path, batch: int, pairs_n: int, device: str) -> dict:
    from cwpo_ray.annotator import new_annotator
    from cwpo_ray.models import ModelSource

    ann = new_annotator(ModelSource(str(model_dir)), max_length=128)
    ann.model.to(device).eval()
    prompts, a, b = _pairs(pairs_n)
    ann.label_pairs(prompts[:batch], a[:batch], b[:batch], batch_size=batch)  # warm-up
    _sync()
    t0 = time.perf_counter()
    ann.label_pairs(prompts, a, b, batch_size=batch)
    _sync()
    seconds = time.perf_counter() - t0
    return {"device": device, "batch": batch, "pairs": pairs_n, "pairs_per_s": pairs_n / seconds}


def _peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def run(models: Path, out: Path, quick: bool, only: list[str] | None = None) -> None:
    import torch

    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    # DeepSpeed initialises torch.distributed itself; one process is a world of one.
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(k, v)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "cwpo-gpu-bench"
    lm = _random_model(models / "smollm2-135m", "causal", work / "smollm2-135m")
    enc = _random_model(models / "minilm-l6", "encoder", work / "minilm-l6")
    results: dict = {"torch": torch.__version__, "cuda": cuda,
                     "gpu": torch.cuda.get_device_name(0) if cuda else None,
                     "cpu_threads": torch.get_num_threads()}
    dev = "cuda" if cuda else "cpu"
    steps = 2 if quick else 20
    flash = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    plan = [
        ("train_fp32_gpu_b8", lambda: train_step_rate(lm, dev, 8, steps, "ddp")),
        ("train_fp32_gpu_b32", lambda: train_step_rate(lm, dev, 32, steps, "ddp")),
        # what `mixed_precision: auto` trains in on a GPU: bf16 DDP; with no_sync over 2 micro-batches,
        # gradient checkpointing, and each sequence in its own row (packing separate) for fast attention
        ("train_bf16_gpu_b32", lambda: train_step_rate(lm, dev, 32, steps, "ddp", precision="bf16")),
        ("train_bf16_gpu_b32_separate", lambda: train_step_rate(lm, dev, 32, steps, "ddp", precision="bf16",
                                                                packing="separate", attention=flash)),
        ("train_bf16_gpu_2x16_nosync_ckpt", lambda: train_step_rate(
            lm, dev, 16, steps, "ddp", precision="bf16", accumulation=2, checkpointing=True, packing="separate",
            attention=flash)),
        ("train_ds_bf16_gpu_b8", lambda: train_step_rate(lm, dev, 8, steps, "deepspeed", precision="bf16")),
        ("train_ds_bf16_gpu_b32", lambda: train_step_rate(lm, dev, 32, steps, "deepspeed", precision="bf16")),
        ("train_ds0_bf16_gpu_b32", lambda: train_step_rate(lm, dev, 32, steps, "deepspeed", 0, precision="bf16")),
        ("train_fp32_cpu_b8", lambda: train_step_rate(lm, "cpu", 8, 2 if quick else 3, "ddp")),
        ("loss_bf16_vs_fp32", lambda: loss_agreement(lm)),
        ("logps_cuda_vs_cpu", lambda: logps_cuda_vs_cpu(lm)),
        ("annotator_bf16_vs_fp32", lambda: annotator_agreement(enc, 256 if quick else 2048)),
        ("vllm_generation", lambda: vllm_generation(lm, 16 if quick else 64)),
        ("generate_b1", lambda: generation_rate(lm, 1, 8 if quick else 32)),
        ("generate_b32", lambda: generation_rate(lm, 32, 32 if quick else 256)),
        ("annotate_b1", lambda: annotator_rate(enc, 1, 16 if quick else 256, dev)),
        ("annotate_b32", lambda: annotator_rate(enc, 32, 64 if quick else 2048, dev)),
        ("annotate_b1_cpu", lambda: annotator_rate(enc, 1, 16 if quick else 128, "cpu")),
        ("annotate_b32_cpu", lambda: annotator_rate(enc, 32, 64 if quick else 256, "cpu")),
    ]
    if not cuda:  # on CPU (a dry run of this script) the DeepSpeed and agreement parts do not apply
        plan = [p for p in plan if "_ds" not in p[0]]
        plan = [p for p in plan if p[0] not in ("loss_bf16_vs_fp32", "logps_cuda_vs_cpu", "annotator_bf16_vs_fp32")]
    if not importlib.util.find_spec("vllm") or not cuda:
        plan = [p for p in plan if p[0] != "vllm_generation"]
    if only:
        plan = [p for p in plan if p[0] in only]
    for name, part in plan:
        t0 = time.perf_counter()
        try:
            results[name] = part()
        except Exception as e:  # noqa: BLE001 — one broken part must not hide the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[name], default=str)}", flush=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    _summary(results)


def _summary(r: dict) -> None:
    def ratio(a, b, key):
        try:
            return f"{r[a][key] / r[b][key]:.1f}x"
        except (KeyError, TypeError, ZeroDivisionError):
            return "n/a"

    print("\nsummary")
    print("  train, GPU fp32 b8 vs CPU fp32 b8:      ", ratio("train_fp32_gpu_b8", "train_fp32_cpu_b8", "pairs_per_s"))
    print("  train, DDP bf16 vs fp32 (b32):          ", ratio("train_bf16_gpu_b32", "train_fp32_gpu_b32", "pairs_per_s"))
    print("  train, bf16 separate vs shared prefix:  ", ratio("train_bf16_gpu_b32_separate", "train_bf16_gpu_b32",
                                                             "pairs_per_s"))
    print("  train, bf16 2x16 no_sync + ckpt vs b32: ", ratio("train_bf16_gpu_2x16_nosync_ckpt",
                                                             "train_bf16_gpu_b32_separate", "pairs_per_s"))
    print("  train, DeepSpeed bf16 vs DDP bf16 (b32):", ratio("train_ds_bf16_gpu_b32", "train_bf16_gpu_b32", "pairs_per_s"))
    print("  generate, batch 32 vs batch 1:          ", ratio("generate_b32", "generate_b1", "prompts_per_s"))
    print("  annotate (GPU), batch 32 vs batch 1:    ", ratio("annotate_b32", "annotate_b1", "pairs_per_s"))
    print("  annotate (CPU), batch 32 vs batch 1:    ", ratio("annotate_b32_cpu", "annotate_b1_cpu", "pairs_per_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="save the models' configs and tokenizers (run where the models are installed)")
    p.add_argument("--out", type=Path, default=Path(".gpu/models"))
    r = sub.add_parser("run", help="measure (on the GPU machine)")
    r.add_argument("--models", type=Path, default=Path(".gpu/models"))
    r.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    r.add_argument("--quick", action="store_true", help="a few steps each: checks the script, not the speed")
    r.add_argument("--only", default="", help="comma-separated part names (default: all)")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    else:
        run(args.models, args.out, args.quick, [x for x in args.only.split(",") if x])


if __name__ == "__main__":
    main()
