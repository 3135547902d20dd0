"""Sampling responses from a causal LM: vLLM on a GPU, batched transformers otherwise.

One entry point, ``generate(model, prompts, settings)``, returns ``n`` responses per prompt in
prompt order. Prompts go through the tokenizer's chat template when it has one (instruct
models answer in their trained format), batches are left-padded (a decoder continues from
the last position, so padding must sit on the left), and every batch is seeded from its
index so the output does not depend on how batches were spread over processes.

``engine="ray"`` spreads the transformers path over a Ray Data actor pool with fractional
CPUs (an actor at a whole CPU starved the read/write tasks on 2 cores).

Every engine has a lifecycle: ``open_generator`` creates it for one model, the caller uses it,
and leaving the ``with`` block releases it (weights dropped, CUDA cache emptied; for vLLM also
its engine-core process), so `cwpo evaluate` can sample the policy and then
the reference in one process: a second vLLM ``LLM`` does not fit next to a live first one.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass(frozen=True)
class GenSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    n: int = 1                 # responses per prompt
    batch_size: int = 16       # prompts per forward batch
    seed: int = 0
    engine: str = "auto"       # auto | vllm | transformers | ray
    num_actors: int = 2        # ray engine only
    threads: int = 0           # torch threads per process (0: leave torch's default)


def batch_seed(seed: int, start: int) -> int:
    """The sampling seed of the batch that starts at prompt ``start``: by position, so a batch
    draws the same responses whichever process (or rerun) generates it."""
    return seed * 1_000_003 + start


def vllm_usable() -> bool:
    """vLLM only when it is installed and a GPU is present (it has no CPU path here)."""
    try:
        import importlib.util

        import torch

        return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    except Exception:
        return False


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The model's own chat format when it has one, else the bare prompt."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return list(prompts)


class TransformersGenerator:
    """Batched sampling with transformers on CPU (or one GPU when present)."""

    def __init__(self, model: str, gguf_file: str | None = None, threads: int = 0):
        import torch

        from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model

        if threads:
            torch.set_num_threads(threads)
        source = resolve_model(model, gguf_file) if not isinstance(model, ModelSource) else model
        self.tokenizer = load_tokenizer(source, padding_side="left")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(source).to(self.device).eval()

    def generate_batch(self, prompts: Sequence[str], s: GenSettings, batch_seed: int) -> list[list[str]]:
        import torch

        enc = self.tokenizer(chat_texts(self.tokenizer, prompts), return_tensors="pt", padding=True,
                             add_special_tokens=not getattr(self.tokenizer, "chat_template", None)).to(self.device)
        torch.manual_seed(batch_seed)
        sample = s.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc, do_sample=sample, temperature=s.temperature if sample else None,
                top_p=s.top_p if sample else None, top_k=0 if sample else None,
                max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * s.n:(i + 1) * s.n] for i in range(len(prompts))]

    def generate(self, prompts: Sequence[str], s: GenSettings, progress: bool = False) -> list[list[str]]:
        out: list[list[str]] = []
        starts = range(0, len(prompts), s.batch_size)
        for k, i in enumerate(starts):
            out += self.generate_batch(prompts[i:i + s.batch_size], s, batch_seed=batch_seed(s.seed, i))
            if progress:
                print(f"  generated {min(i + s.batch_size, len(prompts))}/{len(prompts)} prompts", flush=True)
        return out

    def close(self) -> None:
        self.model = None
        release_accelerator_memory()


def release_accelerator_memory() -> None:
    """Collect dropped models now and hand their cached CUDA blocks back (the next model needs them)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class _RayGenerateBatch:
    """Ray Data actor: one model per actor, reused across batches. A row is one whole prompt
    batch (its start index and its prompts), so batches are the same as in one process."""

    def __init__(self, model: str, gguf_file: str | None, settings: dict):
        self.settings = GenSettings(**settings)
        self.gen = TransformersGenerator(model, gguf_file, threads=self.settings.threads or 1)

    def __call__(self, batch: dict) -> dict:
        import json

        out = []
        for start, prompts in zip(batch["start"], batch["prompts"]):
            responses = self.gen.generate_batch(json.loads(prompts), self.settings,
                                                batch_seed=batch_seed(self.settings.seed, int(start)))
            out.append(json.dumps(responses))
        return {"start": batch["start"], "responses": out}


def _generate_ray(model: str, gguf_file: str | None, prompts: Sequence[str], s: GenSettings) -> list[list[str]]:
    import dataclasses
    import json

    import ray

    from cwpo_ray.ray_env import init_ray

    init_ray()
    starts = range(0, len(prompts), s.batch_size)
    ds = ray.data.from_items([{"start": i, "prompts": json.dumps(list(prompts[i:i + s.batch_size]))} for i in starts])
    ds = ds.repartition(len(starts))
    ds = ds.map_batches(_RayGenerateBatch, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"model": model, "gguf_file": gguf_file,
                                               "settings": dataclasses.asdict(s)},
                        compute=ray.data.ActorPoolStrategy(size=s.num_actors), num_cpus=0.5)
    rows = sorted(ds.take_all(), key=lambda r: int(r["start"]))
    return [r for row in rows for r in json.loads(row["responses"])]


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index`` (vLLM: one per request). By position, as ``batch_seed``:
    the policy and the reference draw with the same seed on the same prompt (common random numbers),
    and different prompts with different seeds."""
    return batch_seed(seed, index)


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as the token ids the transformers engine feeds the model: in the chat format when
    the tokenizer has a template, and then without the tokenizer's own special tokens, which the
    template already wrote (a Llama-3 style template starts with BOS; tokenizing its text again with
    special tokens gives two). Handed to vLLM as ``TokensPrompt``s, so vLLM does not tokenize again."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=not templated)
    return [list(ids) for ids in enc["input_ids"]]


def vllm_sampling_kwargs(s: GenSettings, n_prompts: int) -> list[dict]:
    """The keyword arguments of one vLLM ``SamplingParams`` per prompt. One shared ``SamplingParams``
    carries one seed, and vLLM seeds every request with it: each prompt would draw the same random
    numbers. Greedy (temperature 0) needs no seed."""
    base = dict(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens)
    if s.temperature <= 0:
        return [dict(base) for _ in range(n_prompts)]
    return [dict(base, seed=prompt_seed(s.seed, i)) for i in range(n_prompts)]


def dequantize_to(source, folder) -> str:
    """A GGUF ``source`` (a ``models.ModelSource``) as a plain transformers folder: its weights as
    transformers dequantizes them, and its tokenizer, written atomically into ``folder``."""
    from cwpo_ray.models import load_causal_lm, load_tokenizer
    from cwpo_ray.tables import atomic_path

    with atomic_path(folder) as tmp:
        load_causal_lm(source).save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
    return str(folder)


def use_spawn_for_vllm_workers(environ=os.environ) -> bool:
    """Set ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` when this process has initialised CUDA: vLLM's
    worker processes are forked by default, and a forked child cannot use CUDA once the parent has
    (vLLM's documented fix, docs "Python Multiprocessing" / troubleshooting). Here that happens when
    one process evaluates twice (a Ray worker reused by the next evaluation task, after a reward-model
    judge ran on the GPU). A value the user set is kept. True when it set the variable. Tested here
    with CUDA's state faked (no GPU on the machine that runs the tests)."""
    try:
        import torch

        initialised = torch.cuda.is_available() and torch.cuda.is_initialized()
    except Exception:
        initialised = False
    if initialised and "VLLM_WORKER_MULTIPROC_METHOD" not in environ:
        environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        return True
    return False


class VLLMGenerator:
    """One vLLM engine for one model (vLLM's V1 engine: the model runs in an engine-core process).

    Prompts go in as token ids (``TokensPrompt``, see ``prompt_token_ids``) with one
    ``SamplingParams`` per prompt (``vllm_sampling_kwargs``); ``LLM.generate`` takes a list of
    either, one per prompt, and returns the outputs in prompt order. ``close`` shuts the engine core
    down and drops the engine, so a second ``LLM`` (the reference after the policy) gets the GPU.
    A GGUF model is dequantized into a temporary plain folder first (removed by ``close``): vLLM's
    own GGUF loading covers only some quantization types and architectures. ``cwpo evaluate`` hands
    it a folder it dequantized once and keeps (``evaluate.plain_model``).

    Unverified here: this machine has neither vLLM nor a GPU. The pure parts (token ids, sampling
    arguments, the spawn rule) are tested on CPU; the calls follow vLLM's documented offline API
    (``vllm.LLM``, ``vllm.SamplingParams``, ``vllm.inputs.TokensPrompt``).
    """

    def __init__(self, model: str, gguf_file: str | None, s: GenSettings):
        use_spawn_for_vllm_workers()
        from vllm import LLM

        from cwpo_ray.models import load_tokenizer, resolve_model

        source = resolve_model(model, gguf_file)
        self.tmp = None
        if source.gguf_file:
            import tempfile

            self.tmp = tempfile.mkdtemp(prefix="cwpo-vllm-")
            source = resolve_model(dequantize_to(source, os.path.join(self.tmp, "model")))
        self.tokenizer = load_tokenizer(source)
        self.llm = LLM(model=source.path, tokenizer=source.path, seed=s.seed, dtype="auto")

    def generate(self, prompts: Sequence[str], s: GenSettings, progress: bool = False) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(self.tokenizer, prompts)]
        params = [SamplingParams(**kw) for kw in vllm_sampling_kwargs(s, len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        return [[c.text.strip() for c in o.outputs] for o in outputs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        # The V1 engine runs the model in an engine-core process: stop it now rather than when the
        # finalizer gets to it, so its GPU memory is free for the next engine.
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            with contextlib.suppress(Exception):
                core.shutdown()
        del llm
        release_accelerator_memory()
        if getattr(self, "tmp", None):
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class RayGenerator:
    """Ray Data actors, each loading the model; the actor pool ends with its dataset, so nothing is held here."""

    def __init__(self, model: str, gguf_file: str | None):
        self.model, self.gguf_file = model, gguf_file

    def generate(self, prompts: Sequence[str], s: GenSettings, progress: bool = False) -> list[list[str]]:
        return _generate_ray(self.model, self.gguf_file, prompts, s)

    def close(self) -> None:
        pass


def pick_engine(engine: str) -> str:
    if engine == "auto":
        return "vllm" if vllm_usable() else "transformers"
    if engine not in ("vllm", "transformers", "ray"):
        raise ValueError(f"engine must be auto, vllm, transformers or ray, got {engine!r}")
    return engine


@contextlib.contextmanager
def open_generator(model: str, s: GenSettings, gguf_file: str | None = None) -> Iterator:
    """The engine for one model: created on entry, released on exit (also on errors).

    Use one model at a time: ``with open_generator(policy, s) as g: ...`` and only then the
    reference; two engines alive at once is what runs a GPU out of memory.
    """
    engine = pick_engine(s.engine)
    if engine == "vllm":
        gen = VLLMGenerator(model, gguf_file, s)
    elif engine == "ray":
        gen = RayGenerator(model, gguf_file)
    else:
        gen = TransformersGenerator(model, gguf_file, threads=s.threads)
    try:
        yield gen
    finally:
        gen.close()


def generate(model: str, prompts: Sequence[str], s: GenSettings, gguf_file: str | None = None,
             progress: bool = False) -> list[list[str]]:
    """``s.n`` responses for each prompt, in prompt order; the engine is released before returning."""
    prompts = list(prompts)
    if not prompts:
        return []
    with open_generator(model, s, gguf_file) as gen:
        return gen.generate(prompts, s, progress=progress)
