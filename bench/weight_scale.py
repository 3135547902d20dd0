"""Does a uniform scale of the per-pair weights change what the policy learns?

CW-PO's loss is mean(w_i * loss_i). When every confidence is small (seed 1 of the `full` preset:
mean 0.051), the loss and its gradient are about c times an unweighted arm's. Adam divides the
first gradient moment by the root of the second, so a constant factor c cancels -- except where
the optimizer is not scale-free:
  - gradient clipping (max norm 1.0): clips the unweighted arm's large gradients, not the
    c-scaled ones, so the two see differently rescaled gradients step by step;
  - Adam's eps (1e-8): added to sqrt(v); once c * |g| approaches 1e-8 the step shrinks;
  - warm-up and the cosine schedule multiply the lr alike in both runs (scale-free, listed
    because they set how large the steps are while the above act).

Copies of one model train side by side on the same batches with the loop's own functions
(logprobs.pair_batch / reference_logps / po_loss, fused AdamW as engines.adamw, clipping
and the cosine schedule with warm-up as train-policy's DDP engine): weights 1 and weights c.
Per step: the unweighted DPO loss of each, the pre-clip gradient norms, and the two parameter
updates compared (norm ratio, cosine); at the end the total change theta_T - theta_0 of each.
Variants: as train-policy runs it (clip 1.0), and without clipping.

    python bench/weight_scale.py [--models tiny,smollm2-135m] [--scales 0.05,0.0005] [--steps 40] [--smollm-steps 12]

Prints a Markdown table (and JSON with --json FILE).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
for k, v in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402


def benchmark_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs of the built-in benchmark, chosen by their hidden human label, in a seeded order."""
    import random

    from cwpo_ray.tables import read_table

    rows = read_table(REPO / "cwpo_ray" / "benchmark_data" / "pairs.parquet").to_pylist()
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:n]:
        a = r["human_choice"] == "a"
        out.append({"prompt": r["prompt"], "chosen": r["response_a" if a else "response_b"],
                    "rejected": r["response_b" if a else "response_a"]})
    return out


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    # in float64: a float32 dot product over 135M entries is off by ~1e-2 (it printed cosines of 1.02)
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


class Run:
    """One copy of the model with train-policy's optimizer, schedule and clipping."""

    def __init__(self, model, lr: float, weight_decay: float, warmup: int, steps: int, max_grad_norm: float):
        from transformers import get_cosine_schedule_with_warmup

        from cwpo_ray.engines import adamw

        self.model, self.max_grad_norm = model, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(self.params, lr, weight_decay)
        self.sched = get_cosine_schedule_with_warmup(self.opt, warmup, steps)
        self.model.train()

    def step(self, batch, ref, weights, beta: float) -> dict:
        """As DDPEngine.backward_and_step (one micro-batch), keeping the pre-clip gradient norm."""
        from cwpo_ray.logprobs import po_loss

        loss, m = po_loss(self.model, batch, ref["ref_chosen_logps"], ref["ref_rejected_logps"], weights,
                          loss_type="dpo", beta=beta)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        before = flat(self.params)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss_unweighted": m["loss_unweighted"], "grad_norm": norm, "clipped": bool(
            self.max_grad_norm and norm > self.max_grad_norm), "update": flat(self.params) - before}

    def eps_share(self, eps: float = 1e-8) -> float:
        """Of the entries with a non-zero second moment, the fraction where eps is at least 1% of
        Adam's denominator sqrt(v_hat) + eps: where eps, not the gradient, sets the step size."""
        small = total = 0
        for p in self.params:
            st = self.opt.state.get(p)
            if not st:
                continue
            t = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1 - 0.999 ** t)
            nz = v_hat > 0
            small += int((v_hat[nz].sqrt() < 99 * eps).sum())
            total += int(nz.sum())
        return small / max(total, 1)


def compare(model_path: str, gguf: str | None, *, scales: list[float], steps: int, batch_size: int, lr: float,
            warmup: int, max_grad_norm: float, label: str = "", beta: float = 0.5, weight_decay: float = 0.05,
            threads: int = 2, max_length: int = 96, max_prompt_length: int = 48) -> list[dict]:
    """Weights 1 and weights c (each of ``scales``) from the same start, on the same batches, side by
    side; one result per c, each against the weights-1 run."""
    from cwpo_ray.logprobs import Lengths, pair_batch, reference_logps
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    source = ModelSource(model_path, gguf)
    tok = load_tokenizer(source)
    base = load_causal_lm(source)
    lengths = Lengths(max_prompt_length=max_prompt_length, max_length=max_length, chat=True)
    pairs = benchmark_pairs(steps * batch_size)
    theta0 = flat(base.parameters())
    weights = [1.0, *scales]
    runs = [Run(copy.deepcopy(base), lr, weight_decay, warmup, steps, max_grad_norm) for _ in weights]
    base.eval()
    history, t0 = {c: [] for c in scales}, time.time()
    for s in range(steps):
        chunk = pairs[s * batch_size:(s + 1) * batch_size]
        prompts, chosen, rejected = ([r[k] for r in chunk] for k in ("prompt", "chosen", "rejected"))
        ref = reference_logps(base, tok, prompts, chosen, rejected, lengths)  # the start model, as train-policy
        batch = pair_batch(tok, prompts, chosen, rejected, lengths)
        lr_now = runs[0].sched.get_last_lr()[0]
        out = [run.step(batch, ref, [w] * len(chunk), beta) for run, w in zip(runs, weights)]
        a = out[0]
        for c, o in zip(scales, out[1:]):
            history[c].append({"step": s + 1, "lr": lr_now,
                               "loss_w1": a["loss_unweighted"], "loss_wc": o["loss_unweighted"],
                               "grad_norm_w1": a["grad_norm"], "grad_norm_wc": o["grad_norm"],
                               "clipped_w1": a["clipped"], "clipped_wc": o["clipped"],
                               "update_norm_w1": float(a["update"].norm()), "update_norm_wc": float(o["update"].norm()),
                               "update_cosine": cosine(a["update"], o["update"])})
    d1 = flat(runs[0].params) - theta0
    results = []
    for c, run in zip(scales, runs[1:]):
        dc = flat(run.params) - theta0
        results.append({
            "model": label or (Path(model_path).name if not gguf else gguf), "params": int(theta0.numel()), "scale": c,
            "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "max_grad_norm": max_grad_norm,
            "weight_decay": weight_decay, "beta": beta, "seconds": round(time.time() - t0, 1),
            "total_change_w1": float(d1.norm()), "total_change_wc": float(dc.norm()),
            "total_change_ratio": float(dc.norm() / d1.norm()), "total_change_cosine": cosine(d1, dc),
            "eps_share_w1": runs[0].eps_share(), "eps_share_wc": run.eps_share(), "history": history[c]})
    return results


def summary_row(r: dict) -> str:
    h = r["history"]
    moved = [x for x in h if x["update_norm_w1"] > 0]  # warm-up starts at lr 0: the first step moves nothing
    ratios = [x["update_norm_wc"] / x["update_norm_w1"] for x in moved]
    coss = [x["update_cosine"] for x in moved]
    clip1, clipc = sum(x["clipped_w1"] for x in h), sum(x["clipped_wc"] for x in h)
    g1 = sorted(x["grad_norm_w1"] for x in h)
    gc = sorted(x["grad_norm_wc"] for x in h)
    return (f"| {r['model']} | {r['scale']} | {r['max_grad_norm'] or 'none'} | {r['steps']} x {r['batch_size']} "
            f"| {g1[len(g1) // 2]:.3g} / {gc[len(gc) // 2]:.3g} | {clip1} / {clipc} "
            f"| {min(ratios):.3f}-{max(ratios):.3f} | {min(coss):.4f} "
            f"| {r['total_change_ratio']:.3f} | {r['total_change_cosine']:.4f} "
            f"| {h[-1]['loss_w1']:.4f} / {h[-1]['loss_wc']:.4f} | {r['eps_share_w1']:.1e} / {r['eps_share_wc']:.1e} |")


HEADER = ("| model | c | clip | steps x pairs | median grad norm (1 / c) | steps clipped (1 / c) "
          "| step update norm ratio c/1 (min-max) | min step cosine | total change ratio c/1 | total change cosine "
          "| last-step loss, unweighted (1 / c) | eps share (1 / c) |\n" + "|---" * 12 + "|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--scales", default="0.05,0.0005",
                   help="uniform weights c: seed 1's mean confidence ~0.05; ~0.0005 under T = 100 (seed 0, k-fold)")
    p.add_argument("--steps", type=int, default=40, help="steps for the tiny model")
    p.add_argument("--smollm-steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", default="1.0,0", help="max grad norms to run on the tiny model (0: no clipping)")
    p.add_argument("--smollm-clip", default="1.0", help="max grad norms to run on SmolLM2")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    scales = [float(c) for c in args.scales.split(",")]
    results = []
    for name in args.models.split(","):
        if name == "tiny":
            from tiny_models import build_tiny_decoder

            path, gguf = str(build_tiny_decoder(Path(tempfile.mkdtemp(prefix="ws-tiny-")))), None
            steps, lr, clips = args.steps, 1e-3, args.clip
        else:
            from cwpo_ray.models import resolve_model

            src = resolve_model(name)
            # lr: the full preset's
            path, gguf, steps, lr, clips = src.path, src.gguf_file, args.smollm_steps, 2e-5, args.smollm_clip
        for clip in (float(c) for c in clips.split(",")):
            rs = compare(path, gguf, scales=scales, steps=steps, batch_size=args.batch_size, lr=lr,
                         warmup=max(1, steps // 4), max_grad_norm=clip,
                         label="tiny Llama" if name == "tiny" else name)
            if not results:
                print(HEADER, flush=True)
            results += rs
            for r in rs:
                print(summary_row(r), f"({r['seconds']:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n" + HEADER)
    for r in results:
        print(summary_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
