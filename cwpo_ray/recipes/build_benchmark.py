"""Build the built-in benchmark: opinion prompts, two SmolLM2 answers each, a gold judge, and
simulated noisy human labels.

Prompts come from templates x topics (deterministic with the seed). Each prompt gets two
responses sampled from the policy model (temperature 1.0, short answers). The gold judge
(VADER by default) scores every response. Simulated humans pick response a with probability
sigmoid((gold_a - gold_b) / T) (Bradley-Terry); T is found by bisection on the data so that
the humans agree with the gold judge on target_agreement of the pairs the judge does not tie
(HH-RLHF annotators agree with each other 60-70%). The uniform draws are fixed before the
bisection, so agreement is monotone in T and the tuned labels are exactly reproducible.

Writes OUT/pairs.parquet (id, prompt, response_a, response_b, human_choice, gold_a, gold_b;
`cwpo data --source pairs:OUT` reads it), OUT/test.parquet (held-out prompts: id, prompt,
chosen, rejected ordered by gold, gold_chosen, gold_rejected) and OUT/_benchmark.json (the build report; a leading underscore keeps table readers off it).

The test prompts share every topic and template with the training prompts, so a gain on them
may be memorized topic sentiment. OUT/test_unseen.parquet (id, prompt, topic, template) holds
prompts whose topics (UNSEEN_TOPICS) and templates (UNSEEN_TEMPLATES) occur in no training or
test prompt: prompts only, which is all GRA needs (`cwpo evaluate --prompts` on it skips pair
accuracy) and which `cwpo data` skips. `--unseen-only` writes just that table, with no model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cwpo_ray.config import option, to_dict
from cwpo_ray.tables import atomic_path, write_table

EPILOG = """examples:
  cwpo build-benchmark --out cwpo_ray/benchmark_data                 # the shipped tables
  nice -n 5 cwpo build-benchmark --out runs/bench --num-prompts 3000 --test-prompts 1000
  cwpo build-benchmark --out runs/bench_small --num-prompts 60 --test-prompts 20
  cwpo build-benchmark --out cwpo_ray/benchmark_data --unseen-only      # test_unseen.parquet alone, no model
"""

TEMPLATES = [
    "What do you think about {t}?", "Is {t} worth it?", "Give me your honest opinion of {t}.",
    "Should I try {t}?", "How do you feel about {t}?", "Is {t} overrated?", "Why do people like {t}?",
    "What is the best thing about {t}?", "What is the worst thing about {t}?", "Would you recommend {t}?",
    "Is {t} a good idea for a beginner?", "Convince me that {t} is great.", "Tell me what you love about {t}.",
    "Is {t} a waste of time?", "In one sentence, what is your view on {t}?", "My friend hates {t}. Is she right?",
    "Describe {t} in a few words.", "Would life be better without {t}?", "What would you say to someone who dislikes {t}?",
    "Is {t} fun?", "Rate {t} and explain why.", "What surprised you most about {t}?",
    "Is {t} good for kids?", "Should schools teach more about {t}?", "Is {t} better today than it used to be?",
    "Give me a short review of {t}.", "What is your favorite thing about {t}?", "Do you think {t} is boring?",
    "Why might someone be afraid of {t}?", "Is {t} good for my health?", "Would you spend a weekend on {t}?",
    "What do most people get wrong about {t}?", "Is {t} worth the money?", "Summarize your feelings about {t}.",
    "Can {t} make people happier?", "Is {t} stressful?", "What advice would you give about {t}?",
    "Are you a fan of {t}?", "Is {t} a good hobby?", "What is exciting about {t}?",
]

TOPICS = [
    "gardening", "jazz music", "running marathons", "learning French", "living in a big city", "camping",
    "social media", "video games", "cooking at home", "public transport", "working from home", "reading novels",
    "chess", "yoga", "coffee", "electric cars", "adopting a cat", "owning a dog", "hiking in the mountains",
    "meditation", "online dating", "learning to code", "painting", "classical music", "fast food", "winter",
    "summer holidays", "the beach", "rainy days", "museums", "theme parks", "baking bread", "tea", "podcasts",
    "board games", "cycling to work", "learning the piano", "photography", "science fiction movies", "horror films",
    "poetry", "smartphones", "self-driving cars", "space exploration", "volunteering", "journaling", "minimalism",
    "tiny houses", "road trips", "cruises", "sushi", "spicy food", "vegetarian diets", "early mornings",
    "night shifts", "team sports", "swimming", "dancing", "karaoke", "stand-up comedy", "reality TV", "documentaries",
    "history books", "math", "homeschooling", "studying abroad", "retiring early", "moving to the countryside",
    "houseplants", "birdwatching", "fishing", "knitting", "woodworking", "thrift shopping", "online courses",
    "group projects", "job interviews", "public speaking", "open-plan offices", "bullet journals",
]

# Topics and templates of the unseen-topic test table: none of them occurs in a TOPICS x TEMPLATES
# prompt, and no TOPICS topic or TEMPLATES template occurs in theirs (tested on the shipped tables).
UNSEEN_TEMPLATES = [
    "What are the pros and cons of {t}?", "Tell me a little about {t}.", "Would you call {t} relaxing?",
    "How would you explain {t} to a child?", "Is it silly to care about {t}?", "Do you enjoy {t}?",
    "Could {t} change someone's life?", "How would you describe {t} to a friend?",
]

UNSEEN_TOPICS = [
    "rock climbing", "skiing", "opera", "origami", "beekeeping", "astronomy", "surfing", "pottery", "tennis",
    "golf", "calligraphy", "scuba diving", "ballet", "sailing", "skateboarding", "composting", "crossword puzzles",
    "sudoku", "magic tricks", "juggling", "archery", "kayaking", "chemistry", "philosophy", "economics",
    "architecture", "graffiti", "tattoos", "wine tasting", "cheese making", "vintage clothing", "martial arts",
    "bowling", "ice skating", "embroidery", "sculpture", "manga", "escape rooms", "farmers markets", "kite flying",
]


@dataclass
class Config:
    out: str = option(help="output folder (the shipped tables live in cwpo_ray/benchmark_data)")
    num_prompts: int = option(1200, "prompts in all: train pairs plus held-out test prompts")
    test_prompts: int = option(200, "how many of the prompts are held out as test prompts")
    model: str = option("smollm2-135m", "model that samples the two responses (alias, folder or hub id)")
    temperature: float = option(1.0, "sampling temperature of the responses")
    max_new_tokens: int = option(40, "new tokens per response")
    batch_size: int = option(16, "prompts per generation batch")
    engine: str = option("transformers", "generation engine: auto, vllm, transformers or ray (Ray Data actors)",
                         choices=("auto", "vllm", "transformers", "ray"))
    threads: int = option(0, "torch threads (0: torch's default)")
    judge: str = option("vader", "gold judge: vader, module:function, or a reward-model folder / hub id")
    target_agreement: float = option(0.675, "agreement of simulated humans with the gold judge, in (0.5, 1)")
    seed: int = option(0, "seed of prompt choice, sampling and human labels")
    unseen_prompts: int = option(200, "prompts on unseen topics and templates written to test_unseen.parquet "
                                      "(prompts only; 0: none)")
    unseen_only: bool = option(False, "write only test_unseen.parquet (no model, no generation)")

    def validate(self) -> None:
        if not 0 <= self.unseen_prompts <= len(UNSEEN_TEMPLATES) * len(UNSEEN_TOPICS):
            raise ValueError(f"unseen_prompts must be in [0, {len(UNSEEN_TEMPLATES) * len(UNSEEN_TOPICS)}] "
                             f"(unseen templates x topics), got {self.unseen_prompts}")
        if self.unseen_only and not self.unseen_prompts:
            raise ValueError("unseen_only needs unseen_prompts > 0")
        if not 0 < self.test_prompts < self.num_prompts:
            raise ValueError(f"test_prompts must be in (0, num_prompts), got {self.test_prompts}")
        if self.num_prompts > len(TEMPLATES) * len(TOPICS):
            raise ValueError(f"num_prompts can be at most {len(TEMPLATES) * len(TOPICS)} (templates x topics)")
        if not 0.5 < self.target_agreement < 1.0:
            raise ValueError(f"target_agreement must be in (0.5, 1), got {self.target_agreement}")


# ----------------------------------------------------------------------------- pure parts

def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct template x topic prompts: the first ``n`` of a seeded shuffle, so a smaller
    build is a prefix of a larger one (same test prompts, reusable generations)."""
    combos = [tpl.format(t=topic) for topic in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(combos)
    return combos[:n]


def make_unseen_prompts(n: int, seed: int) -> list[dict]:
    """``n`` distinct prompts from UNSEEN_TEMPLATES x UNSEEN_TOPICS, a seeded shuffle (prefix-stable like
    ``make_prompts``), each with its topic and template."""
    combos = [{"prompt": tpl.format(t=topic), "topic": topic, "template": tpl}
              for topic in UNSEEN_TOPICS for tpl in UNSEEN_TEMPLATES]
    random.Random(f"{seed}:unseen").shuffle(combos)
    return combos[:n]


def write_unseen_test(out: Path, n: int, seed: int) -> Path:
    """OUT/test_unseen.parquet: id, prompt, topic, template (prompts only)."""
    rows = [{"id": f"bench-unseen-{seed}-{i:05d}", **r} for i, r in enumerate(make_unseen_prompts(n, seed))]
    write_table(pa.Table.from_pylist(rows), out / "test_unseen.parquet")
    return out / "test_unseen.parquet"


def p_a(d, temperature: float):
    """Bradley-Terry probability that a human picks response a, given gold_a - gold_b = d."""
    return 0.5 * (1.0 + np.tanh(np.asarray(d, float) / (2.0 * temperature)))  # sigmoid without overflow


def agreement(gold_a, gold_b, u, temperature: float) -> float:
    """Fraction of non-tied pairs where the simulated human (a if u < P(a)) picks the gold-better one."""
    d = np.asarray(gold_a, float) - np.asarray(gold_b, float)
    picks_a = u < p_a(d, temperature)
    decided = d != 0
    if not decided.any():
        return float("nan")
    return float(np.mean(picks_a[decided] == (d[decided] > 0)))


def tune_temperature(gold_a, gold_b, u, target: float, iters: int = 60) -> float:
    """Bisection on log T: agreement falls as T rises (the draws ``u`` are fixed)."""
    lo, hi = math.log(1e-4), math.log(1e3)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if agreement(gold_a, gold_b, u, math.exp(mid)) > target:
            lo = mid  # still too faithful: more noise
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def human_choices(gold_a, gold_b, u, temperature: float) -> list[str]:
    d = np.asarray(gold_a, float) - np.asarray(gold_b, float)
    return ["a" if x else "b" for x in (u < p_a(d, temperature))]


# ----------------------------------------------------------------------------- the recipe

def sample_pairs(cfg: Config, prompts: list[str], cache: Path) -> list[tuple[str, str]]:
    """Two responses per prompt. Generation is the expensive part, so every finished batch is
    appended to ``cache`` (JSON lines) and a rerun -- after a crash, or with fewer prompts, since
    the prompt order is prefix-stable -- generates only what is missing."""
    from cwpo_ray.generation import GenSettings, TransformersGenerator, batch_seed, generate, pick_engine

    settings = GenSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, n=2,
                           batch_size=cfg.batch_size, seed=cfg.seed, engine=cfg.engine, threads=cfg.threads)
    if pick_engine(cfg.engine) != "transformers":
        return [tuple(r) for r in generate(cfg.model, prompts, settings, progress=True)]
    key = [cfg.model, cfg.temperature, cfg.max_new_tokens, cfg.seed, cfg.batch_size]
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec["key"] == key:
                done[rec["start"]] = rec
    generator, out = None, []
    with open(cache, "a") as fh:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            rec = done.get(start)
            if rec is None or rec["prompts"] != batch:
                generator = generator or TransformersGenerator(cfg.model, threads=cfg.threads)
                rec = {"key": key, "start": start, "prompts": batch,
                       "responses": generator.generate_batch(batch, settings, batch_seed(cfg.seed, start))}
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(f"  generated {start + len(batch)}/{len(prompts)} prompts", flush=True)
            out += [tuple(r) for r in rec["responses"]]
    return out


def run(cfg: Config) -> int:
    from cwpo_ray.judges import load_judge

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.unseen_only:
        path = write_unseen_test(out, cfg.unseen_prompts, cfg.seed)
        print(f"cwpo build-benchmark: {cfg.unseen_prompts} prompts on unseen topics -> {path}", flush=True)
        return 0
    prompts = make_prompts(cfg.num_prompts, cfg.seed)
    print(f"cwpo build-benchmark: sampling 2 responses for {len(prompts)} prompts from {cfg.model}", flush=True)
    cache = out / "_generations.jsonl"  # underscore: table readers skip it
    responses = sample_pairs(cfg, prompts, cache)
    gen_seconds = time.time() - t0

    # Drop pairs no one can judge: an empty answer or two identical answers.
    rows = [(i, p, a, b) for i, (p, (a, b)) in enumerate(zip(prompts, responses)) if a and b and a != b]
    dropped = len(prompts) - len(rows)
    judge = load_judge(cfg.judge)
    gold = np.asarray(judge([(p, r) for _, p, a, b in rows for r in (a, b)]), float).reshape(-1, 2)

    n_test = min(cfg.test_prompts, len(rows) // 2)  # prompts were dropped only if both answers failed
    test_rows, test_gold = rows[:n_test], gold[:n_test]
    train_rows, train_gold = rows[n_test:], gold[n_test:]

    rng = np.random.default_rng(cfg.seed)
    u = rng.random(len(train_rows))
    temp = tune_temperature(train_gold[:, 0], train_gold[:, 1], u, cfg.target_agreement)
    choices = human_choices(train_gold[:, 0], train_gold[:, 1], u, temp)
    agree = agreement(train_gold[:, 0], train_gold[:, 1], u, temp)

    write_table(pa.Table.from_pylist([
        {"id": f"bench-{cfg.seed}-{i:05d}", "prompt": p, "response_a": a, "response_b": b, "human_choice": c,
         "gold_a": float(g[0]), "gold_b": float(g[1])}
        for (i, p, a, b), g, c in zip(train_rows, train_gold, choices)]), out / "pairs.parquet")
    write_table(pa.Table.from_pylist([test_row(cfg.seed, i, p, a, b, g) for (i, p, a, b), g in zip(test_rows, test_gold)]),
                out / "test.parquet")
    if cfg.unseen_prompts:
        write_unseen_test(out, cfg.unseen_prompts, cfg.seed)

    diff = np.abs(train_gold[:, 0] - train_gold[:, 1])
    report = {
        "config": to_dict(cfg), "train_pairs": len(train_rows), "test_prompts": len(test_rows),
        "dropped_empty_or_identical": dropped, "bt_temperature": temp, "human_gold_agreement": agree,
        "gold_ties": int(np.sum(diff == 0)), "gold_diff_gt_0.3": float(np.mean(diff > 0.3)),
        "mean_gold": float(gold.mean()), "generation_seconds": round(gen_seconds, 1),
        "test_unseen_prompts": cfg.unseen_prompts,
        "seconds": round(time.time() - t0, 1),
    }
    with atomic_path(out / "_benchmark.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    cache.unlink(missing_ok=True)
    print(f"cwpo build-benchmark: {len(train_rows)} train pairs, {len(test_rows)} test prompts "
          f"({dropped} dropped); humans agree with gold {agree:.3f} at T={temp:.4f}; "
          f"|gold diff| > 0.3 on {report['gold_diff_gt_0.3']:.0%}; {report['seconds']} s -> {out}", flush=True)
    return 0


def test_row(seed: int, i: int, prompt: str, a: str, b: str, g) -> dict:
    """A held-out prompt with its two responses ordered by the gold judge (ties keep a first)."""
    a_wins = g[0] >= g[1]
    return {"id": f"bench-test-{seed}-{i:05d}", "prompt": prompt,
            "chosen": a if a_wins else b, "rejected": b if a_wins else a,
            "gold_chosen": float(max(g)), "gold_rejected": float(min(g))}
