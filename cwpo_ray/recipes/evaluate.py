"""Gold reward accuracy (GRA) of an aligned policy against its SFT start.

For every test prompt, one response is sampled from the policy and one from the reference
(its SFT start) with the same seed, so two identical models produce identical responses and
score exactly 0.5. The gold judge scores both; GRA is the fraction of prompts where the
policy's response scores higher (ties count half), with a 95% percentile-bootstrap interval;
``gra_strict`` (ties count 0: the paper's definition) and its interval beside it.
Also reported: the mean gold reward of each model and, on the test pairs (chosen / rejected),
the implicit-reward accuracy: how often the policy's log-prob margin over the reference
prefers the chosen response (pairs the gold judge ties are skipped when gold columns exist;
a prompts-only table, such as the built-in benchmark's test_unseen.parquet, skips it).

Every judge in ``extra_judges`` scores the same responses too, and every GRA metric is reported
per judge: ``gra``, ``gra_strict``, ... for the main judge, ``textblob.gra``, ... for an extra
one, so a gain that shows under one judge only can be told from one that shows under all.

Writes OUT/eval.json and OUT/responses.parquet (per prompt: both responses, ``policy_score`` /
``reference_score`` under the main judge and ``policy_score_<judge>`` / ``reference_score_<judge>``
under every judge); logs the metrics to the active MLflow run, or to --run-id when given, as
``eval/*`` for the test split, ``validation/*`` for the validation split (so numbers that
selected a model never mix with the numbers reported for it) and ``test_unseen/*`` for a second
test set (the pipeline's ``evaluate.unseen_prompts``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa

from cwpo_ray.config import option, to_dict
from cwpo_ray.evaluation.scoring import cached, implicit_accuracy, judge_metrics
from cwpo_ray.evaluation.reporting import log_to_mlflow

EPILOG = """examples:
  cwpo evaluate --policy runs/cw-dpo/policy --reference runs/cw-dpo/sft --prompts runs/data/bench/test.parquet --out runs/cw-dpo/eval
  cwpo evaluate --policy P --reference smollm2-135m --prompts test.parquet --judge my_rms:score --out E
  cwpo evaluate --policy P --reference R --prompts runs/data/bench/validation.parquet --split validation --out E
  cwpo evaluate --policy P --reference R --prompts cwpo_ray/benchmark_data/test_unseen.parquet --out E
"""

SPLITS = ("test", "validation", "test_unseen")


@dataclass
class Settings:
    """How a policy is evaluated: everything but the models, the prompts, the output and run bookkeeping.
    The pipeline's ``evaluate`` section is this class."""

    judge: str = option("vader", "gold judge: vader, module:function, an annotator folder or a reward-model "
                                 "folder / hub id")
    temperature: float = option(0.95, "sampling temperature (paper: 0.95)")
    max_new_tokens: int = option(64, "new tokens per response")
    max_prompts: Optional[int] = option(None, "evaluate only the first N test prompts")
    batch_size: int = option(16, "prompts per generation batch")
    engine: str = option("auto", "generation: auto (vLLM on a GPU, else transformers), vllm, transformers, ray",
                         choices=("auto", "vllm", "transformers", "ray"))
    pair_accuracy: bool = option(True, "also compute implicit-reward accuracy on the test pairs")
    max_length: int = option(256, "pair accuracy: max tokens of prompt + response (the pipeline uses the policy's)")
    max_prompt_length: int = option(128, "pair accuracy: max prompt tokens (the pipeline uses the policy's)")
    chat_template: bool = option(True, "pair accuracy: prompts in the model's chat format (as train-policy; the "
                                       "pipeline uses the policy's)")
    n_boot: int = option(2000, "bootstrap resamples of the GRA interval")
    extra_judges: list[str] = option(help="judges that score the same responses beside the main one (every GRA "
                                          "metric per judge, as JUDGE.gra ...); the default, textblob, made no "
                                          "label of the built-in benchmark", factory=lambda: ["textblob"])
    split: str = option("test", "which split the prompts are: test (metrics logged as eval/*), validation "
                                "(validation/*; for choosing a model, never for reporting) or test_unseen "
                                "(test_unseen/*: prompts of topics the training data never had); the pipeline "
                                "evaluates on the test or validation table", choices=SPLITS)
    unseen_prompts: str = option("", "pipeline: also evaluate every arm on these prompts as the test_unseen split "
                                     "(`builtin`: the benchmark's test_unseen.parquet); empty: not at all")
    num_cpus: float = option(1.0, "pipeline: CPUs of the Ray task that evaluates (also its torch threads)")
    num_gpus: float = option(0.0, "pipeline: GPUs of the Ray task that evaluates (1 on a GPU cluster)")
    node_resource: str = option("", "pipeline: a custom Ray resource of the nodes the evaluation may run on "
                                    "(the task asks 0.01 of it), e.g. a node type's label; empty: any node")

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1, got {self.max_prompts}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        keys = [judge_key(j) for j in [self.judge, *self.extra_judges]]
        if any(not k for k in keys):
            raise ValueError("extra_judges: a judge name is empty")
        if len(set(keys[1:])) != len(keys[1:]):
            raise ValueError(f"extra_judges: two judges share a name ({', '.join(keys[1:])})")


def judge_key(spec: str) -> str:
    """The short name a judge's metrics and columns carry: ``textblob``, ``vader``; for a folder or
    hub id its last part, ``module_function`` for ``module:function``; only [A-Za-z0-9_-] kept (a
    dot separates the judge from the metric, and MLflow and Parquet accept these everywhere)."""
    import re

    spec = spec.strip().rstrip("/\\")
    tail = re.split(r"[/\\]", spec)[-1] if spec else ""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", tail).strip("_").lower()


def extra_judge_specs(cfg: "Settings") -> list[str]:
    """The extra judges to run: the main judge is not run twice."""
    main = judge_key(cfg.judge)
    return [j for j in cfg.extra_judges if judge_key(j) != main]


@dataclass(kw_only=True)
class Config(Settings):
    policy: str = option(help="aligned policy folder (or model alias / hub id)")
    reference: str = option(help="its SFT start: folder, model alias or hub id")
    prompts: str = option(help="test table: id, prompt (chosen, rejected for pair accuracy)", must_exist=True)
    out: str = option(help="output folder for eval.json and responses.parquet")
    seed: int = option(0, "sampling and bootstrap seed")
    experiment: str = option("cwpo", "MLflow experiment (used with --run-id)")
    run_id: str = option("", "MLflow run to log eval/* metrics to (default: the active run, if any)")
    cache_dir: str = option("", "reuse the reference's responses and log-probs across evaluations "
                                "(the pipeline's arms share one SFT start)")


def load_test(cfg: Config) -> list[dict]:
    from cwpo_ray.tables import read_table

    rows = read_table(cfg.prompts).to_pylist()
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{cfg.prompts}: a test table needs a prompt column")
    return rows[:cfg.max_prompts] if cfg.max_prompts else rows


def plain_model(spec: str, folder: Path) -> str:
    """``spec`` itself, unless it is a GGUF model (a ``.gguf`` file, or an alias such as smollm2-135m):
    then a plain transformers folder with its dequantized weights and its tokenizer, written once into
    ``folder``/NAME (NAME from the GGUF file's path, size and mtime, so a changed file is written again)
    and reused after. The pipeline does the same for its start model (``run_start_model``).

    vLLM is given this folder, not the GGUF file: its GGUF loading covers only some quantization
    types and architectures and takes the tokenizer from the file, where transformers (the
    generator's other engine, and every other loader here) dequantizes any of them. Kept, unlike the
    generator's temporary one, so the policy and the reference (and a rerun) dequantize once. Not run
    with vLLM here (no GPU, no vLLM on the machine that tests this).
    """
    from cwpo_ray.fingerprints import path_fingerprint
    from cwpo_ray.generation import dequantize_to
    from cwpo_ray.models import resolve_model

    source = resolve_model(spec)
    if not source.gguf_file:
        return spec
    gguf = Path(source.path) / source.gguf_file
    dst = Path(folder) / f"{Path(source.gguf_file).stem}-{path_fingerprint(gguf)[:8]}"
    if not (dst / "config.json").is_file():  # written atomically: a folder that exists is complete
        dst.parent.mkdir(parents=True, exist_ok=True)
        print(f"cwpo evaluate: dequantizing {gguf} once into {dst} (vLLM loads plain folders)", flush=True)
        dequantize_to(source, dst)
    return str(dst)


def with_plain_models(cfg: Config, engine: str) -> Config:
    """For the vLLM engine, the policy and the reference as plain folders (``plain_model``), under
    OUT/models (or the shared cache_dir, where the pipeline's arms share one reference)."""
    from dataclasses import replace

    if engine != "vllm":
        return cfg
    folder = Path(cfg.cache_dir or cfg.out) / "models"
    return replace(cfg, policy=plain_model(cfg.policy, folder), reference=plain_model(cfg.reference, folder))


def sample(cfg: Config, model: str, prompts: list[str]) -> list[str]:
    from cwpo_ray.generation import GenSettings, generate

    s = GenSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, n=1,
                    batch_size=cfg.batch_size, seed=cfg.seed, engine=cfg.engine)
    return [r[0] for r in generate(model, prompts, s)]


def run(cfg: Config) -> int:
    from cwpo_ray.judges import judge_name, load_judge
    from cwpo_ray.tables import atomic_path, write_table

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_test(cfg)
    prompts = [r["prompt"] for r in rows]
    from cwpo_ray.generation import pick_engine

    cfg = with_plain_models(cfg, pick_engine(cfg.engine))

    # Same seed for both models: common random numbers make the comparison less noisy.
    policy_responses = sample(cfg, cfg.policy, prompts)
    reference_responses = cached(cfg, "responses", rows, lambda: sample(cfg, cfg.reference, prompts))
    gen_seconds = time.time() - t0

    # Every judge scores the same responses; the main one's metrics keep their plain names.
    judge = load_judge(cfg.judge)
    specs = [cfg.judge, *extra_judge_specs(cfg)]
    keys = [judge_key(j) for j in specs]
    scores = {}
    for key, j in zip(keys, [judge] + [load_judge(s) for s in specs[1:]]):
        scores[key] = ([float(x) for x in j(list(zip(prompts, policy_responses)))],
                       [float(x) for x in j(list(zip(prompts, reference_responses)))])
    policy_scores, reference_scores = scores[keys[0]]
    metrics = judge_metrics(policy_scores, reference_scores, cfg)
    for key in keys[1:]:
        metrics.update({f"{key}.{k}": v for k, v in judge_metrics(*scores[key], cfg).items() if k != "n"})
    if cfg.pair_accuracy and rows and "chosen" in rows[0]:
        metrics["pair_accuracy"], metrics["n_pairs"] = implicit_accuracy(cfg, rows)
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["generation_seconds"] = round(gen_seconds, 1)

    write_table(pa.Table.from_pylist([
        {"id": str(r.get("id", i)), "prompt": p, "policy_response": a, "reference_response": b,
         "policy_score": policy_scores[i], "reference_score": reference_scores[i],
         **{f"{side}_score_{key}": scores[key][s][i] for key in keys for s, side in enumerate(("policy", "reference"))}}
        for i, (r, p, a, b) in enumerate(zip(rows, prompts, policy_responses, reference_responses))]),
        out / "responses.parquet")
    report = {"stage": "evaluate", "split": cfg.split, "judge": judge_name(judge), "judges": keys,
              "metrics": metrics, "config": to_dict(cfg)}
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    run_id = log_to_mlflow(cfg, metrics, out, keys)
    pa_text = f", pair accuracy {metrics['pair_accuracy']:.3f}" if "pair_accuracy" in metrics else ""
    extra = "".join(f"; {k} GRA {metrics[k + '.gra']:.3f} [{metrics[k + '.gra_lo']:.3f}, {metrics[k + '.gra_hi']:.3f}]"
                    for k in keys[1:])
    print(f"cwpo evaluate ({cfg.split}): GRA {metrics['gra']:.3f} [{metrics['gra_lo']:.3f}, {metrics['gra_hi']:.3f}] "
          f"(strict {metrics['gra_strict']:.3f}) on {metrics['n']} prompts under {keys[0]}; gold "
          f"{metrics['gold_policy']:.3f} vs {metrics['gold_reference']:.3f} (reference){extra}{pa_text}; "
          f"{metrics['seconds']} s -> {out / 'eval.json'}" + (f" (MLflow run {run_id})" if run_id else ""), flush=True)
    return 0
