"""The GPU-cluster paths that a CPU machine can check: what the vLLM engine is given (token ids, one
SamplingParams per prompt, the spawn rule, its teardown), the GGUF dequantization before vLLM in
`cwpo evaluate`, and the pipeline's evaluation task, which logs nothing and leaves MLflow to the driver.

vLLM itself is not installed here and there is no GPU: the engine's calls are not run (see
cwpo_ray/generation.py's VLLMGenerator docstring)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from cwpo_ray import generation
from cwpo_ray.generation import GenSettings, prompt_token_ids, use_spawn_for_vllm_workers, vllm_sampling_kwargs


# ----------------------------------------------------------------------------- what vLLM is given

class BosTemplateTokenizer:
    """A tokenizer whose chat template writes BOS itself and which adds BOS when asked for special
    tokens (Llama 3's pair): tokenizing the templated text with special tokens gives two BOS."""

    chat_template = "{{ bos_token }}..."
    bos = 1

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<s>" + messages[0]["content"]

    def __call__(self, texts, add_special_tokens=True):
        def ids(text):
            body = [self.bos] if text.startswith("<s>") else []
            body += [ord(c) for c in text.removeprefix("<s>")]
            return ([self.bos] if add_special_tokens else []) + body
        return {"input_ids": [ids(t) for t in texts]}


def test_vllm_prompts_are_token_ids_with_one_bos():
    ids = prompt_token_ids(BosTemplateTokenizer(), ["hi", "yo"])
    assert ids == [[1, ord("h"), ord("i")], [1, ord("y"), ord("o")]]  # the template's BOS, not a second one


def test_vllm_prompt_ids_are_what_the_transformers_engine_encodes(tiny_decoder):
    """Without a chat template: the tokenizer's own special tokens, as TransformersGenerator encodes."""
    from cwpo_ray.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(tiny_decoder)), padding_side="left")
    prompts = ["tell me about cats", "hi"]
    assert not getattr(tok, "chat_template", None)
    assert prompt_token_ids(tok, prompts) == [list(x) for x in tok(prompts, add_special_tokens=True)["input_ids"]]


def test_one_sampling_params_per_prompt_each_with_its_own_seed():
    s = GenSettings(temperature=0.95, top_p=0.9, max_new_tokens=12, n=2, seed=3)
    kw = vllm_sampling_kwargs(s, 5)
    assert len(kw) == 5
    assert [k["seed"] for k in kw] == [generation.prompt_seed(3, i) for i in range(5)]
    assert len({k["seed"] for k in kw}) == 5  # not one seed shared by every prompt
    assert all(k["n"] == 2 and k["temperature"] == 0.95 and k["top_p"] == 0.9 and k["max_tokens"] == 12 for k in kw)
    # The policy and the reference are sampled with the same seeds, prompt by prompt (common random numbers).
    assert vllm_sampling_kwargs(s, 5) == kw
    assert vllm_sampling_kwargs(GenSettings(seed=4, temperature=0.95), 2)[0]["seed"] != kw[0]["seed"]
    assert all("seed" not in k for k in vllm_sampling_kwargs(GenSettings(temperature=0.0), 3))  # greedy


def test_spawn_is_set_only_where_cuda_was_initialised(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    env = {}
    assert use_spawn_for_vllm_workers(env) and env == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "forkserver"}  # the user's choice is kept
    assert not use_spawn_for_vllm_workers(env) and env["VLLM_WORKER_MULTIPROC_METHOD"] == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    env = {}
    assert not use_spawn_for_vllm_workers(env) and env == {}


def test_vllm_close_stops_the_engine_core_and_imports_nothing_of_vllm(monkeypatch):
    """V1 teardown only: the engine core is shut down and the engine dropped. The V0 recipe
    (vllm.distributed.parallel_state) is gone: here, where vLLM is not installed, it raised."""
    calls = []
    core = types.SimpleNamespace(shutdown=lambda: calls.append("shutdown"))
    gen = object.__new__(generation.VLLMGenerator)
    gen.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm...` raises ImportError
    gen.close()
    assert calls == ["shutdown"] and gen.llm is None
    gen.close()  # twice is fine
    assert calls == ["shutdown"]


# ----------------------------------------------------------------------------- GGUF before vLLM

@pytest.fixture
def fake_dequantize(monkeypatch):
    """models.load_causal_lm / load_tokenizer that write a tiny folder, counting the loads (the real
    dequantization is tests/test_pipeline.py's test of run_start_model)."""
    from cwpo_ray import models

    loads = []

    class Saved:
        def __init__(self, what):
            self.what = what

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / ("config.json" if self.what == "model" else "tokenizer.json")).write_text("{}")

    def load_causal_lm(source, *a, **k):
        loads.append(str(source))
        return Saved("model")

    monkeypatch.setattr(models, "load_causal_lm", load_causal_lm)
    monkeypatch.setattr(models, "load_tokenizer", lambda source, *a, **k: Saved("tokenizer"))
    return loads


def _eval_config(tmp_path, policy, reference, **kw):
    from cwpo_ray.recipes import evaluate as ev

    prompts = tmp_path / "test.parquet"
    if not prompts.exists():
        import pyarrow as pa

        from cwpo_ray.tables import write_table

        write_table(pa.Table.from_pylist([{"id": "1", "prompt": "Is rain good?"}, {"id": "2", "prompt": "Hi"}]),
                    prompts)
    return ev.Config(policy=policy, reference=reference, prompts=str(prompts), out=str(tmp_path / "eval"),
                     extra_judges=[], pair_accuracy=False, **kw)


def test_a_gguf_model_is_dequantized_once_for_vllm_only(tmp_path, tiny_decoder, fake_dequantize):
    from cwpo_ray.recipes import evaluate as ev

    cfg = _eval_config(tmp_path, "smollm2-135m", str(tiny_decoder))
    assert ev.with_plain_models(cfg, "transformers") is cfg  # transformers reads GGUF itself
    plain = ev.with_plain_models(cfg, "vllm")
    folder = Path(plain.policy)
    assert folder.parent == tmp_path / "eval" / "models" and (folder / "config.json").is_file()
    assert plain.reference == str(tiny_decoder)  # a plain folder stays as it is
    assert len(fake_dequantize) == 1
    assert ev.with_plain_models(cfg, "vllm").policy == plain.policy and len(fake_dequantize) == 1  # reused


def test_cwpo_evaluate_hands_the_vllm_engine_a_plain_folder(tmp_path, tiny_decoder, fake_dequantize, monkeypatch):
    from cwpo_ray.recipes import evaluate as ev

    sampled = []
    monkeypatch.setattr(generation, "pick_engine", lambda engine: "vllm")
    monkeypatch.setattr(ev, "sample", lambda cfg, model, prompts: sampled.append(model) or ["ok"] * len(prompts))
    cfg = _eval_config(tmp_path, "smollm2-135m", "smollm2-135m", judge="vader", engine="vllm")
    assert ev.run(cfg) == 0
    assert len(sampled) == 2 and all(Path(m, "config.json").is_file() for m in sampled)
    assert len(fake_dequantize) == 1  # policy and reference are the same GGUF: one folder


# ----------------------------------------------------------------------------- MLflow from the driver

def test_the_evaluation_task_logs_nothing_and_the_driver_logs_its_report(tmp_path, tiny_decoder, monkeypatch):
    """The pipeline's evaluation task, run as on another node: any MLflow access there fails (the
    driver's SQLite store, with MLFLOW_TRACKING_URI unset, is a file on the head node). It returns its
    report; the driver logs metrics, judge tags and eval.json to the arm's run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking
    from cwpo_ray.recipes import pipeline
    from cwpo_ray.orchestration import stages

    driver_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", driver_uri)
    client = MlflowClient(driver_uri)
    experiment = client.create_experiment("cwpo-task", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    def no_mlflow_here(*a, **k):
        raise AssertionError("the evaluation task touched MLflow")

    task_calls = []

    class FakeRemote:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, ecfg):
            task_calls.append(ecfg)
            with monkeypatch.context() as m:  # "another node": no tracking store reachable
                m.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/no-such-dir/mlflow.db")
                for target, name in ((mlflow, "start_run"), (mlflow, "log_metrics"), (mlflow, "log_artifact"),
                                     (tracking, "start_run"), (tracking, "set_experiment")):
                    m.setattr(target, name, no_mlflow_here)
                return self.fn(ecfg)

    fake_ray = types.SimpleNamespace(remote=lambda **opts: (lambda fn: FakeRemote(fn)), get=lambda x: x,
                                     get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "node-1"))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)

    from cwpo_ray.recipes.evaluate import Settings

    cfg = pipeline.Config(experiment="cwpo-task", evaluate=Settings(max_new_tokens=4, batch_size=4, engine="transformers",
                                                                    extra_judges=[], pair_accuracy=False))
    test = _eval_config(tmp_path, "x", "x").prompts
    out = tmp_path / "arm" / "eval"
    metrics = stages.evaluate_policy(cfg, str(tiny_decoder), str(tiny_decoder), test, out, run_id)

    (ecfg,) = task_calls
    assert ecfg.run_id == ""  # the task is given no run to log to
    assert metrics["gra"] == 0.5 and metrics["n"] == 2  # the same model twice
    run = client.get_run(run_id)
    assert run.data.metrics["eval/gra"] == 0.5 and run.data.metrics["eval/n"] == 2
    assert run.data.tags["eval/judge"] == "vader" and run.data.tags["eval/judges"] == "vader"
    assert "eval.json" in {a.path for a in client.list_artifacts(run_id)}
    assert json.loads((out / "eval.json").read_text())["metrics"]["gra"] == 0.5


def test_log_report_without_the_eval_folder_logs_the_report_itself(tmp_path, monkeypatch):
    """A driver that does not see the task's output folder still logs eval.json (from the report)."""
    from mlflow.tracking import MlflowClient

    from cwpo_ray.evaluation import reporting as ev

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cwpo-report", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    report = {"split": "validation", "judges": ["vader", "textblob"],
              "metrics": {"gra": 0.75, "n": 4, "textblob.gra": 0.5, "nan": float("nan"), "flag": True}}
    ev.log_report(run_id, report, tmp_path / "not-here", uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"validation/gra": 0.75, "validation/n": 4.0, "validation/textblob.gra": 0.5}
    assert run.data.tags["validation/judges"] == "vader,textblob"
    assert [a.path for a in client.list_artifacts(run_id, "validation")] == ["validation/eval.json"]


def test_evaluate_policy_as_a_real_ray_task(ray_cluster, tiny_decoder, tmp_path, monkeypatch):
    """The same through Ray (a local node here): the task's report comes back, the driver logs it."""
    from mlflow.tracking import MlflowClient

    from cwpo_ray.recipes import pipeline
    from cwpo_ray.orchestration import stages
    from cwpo_ray.recipes.evaluate import Settings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("cwpo-ray-task",
                                                        artifact_location=(tmp_path / "a").as_uri())).info.run_id
    cfg = pipeline.Config(evaluate=Settings(max_new_tokens=4, batch_size=4, engine="transformers", extra_judges=[],
                                            pair_accuracy=False, num_cpus=0.5))
    test = _eval_config(tmp_path, "x", "x").prompts
    metrics = stages.evaluate_policy(cfg, str(tiny_decoder), str(tiny_decoder), test, tmp_path / "eval", run_id)
    assert metrics["gra"] == 0.5
    assert client.get_run(run_id).data.metrics["eval/gra"] == 0.5


def test_the_builtin_test_table_is_copied_next_to_the_split(tmp_path):
    """With the built-in benchmark, the evaluation task reads a copy on the run's storage, not the
    driver's package (under `ray job submit`, a temporary copy on the head node)."""
    from cwpo_ray.recipes import pipeline
    from cwpo_ray.orchestration import stages
    from cwpo_ray.tables import read_table

    cfg = pipeline.Config(out=str(tmp_path), max_unlabeled=8)
    tables = stages.run_data(cfg, tmp_path / "data")
    copy = Path(tables["builtin_test"])
    assert copy.parent == tmp_path / "data" and pipeline.resolve_test(cfg, tables) == str(copy)
    assert read_table(copy).equals(read_table(stages.PACKAGE / "benchmark_data" / "test.parquet"))
    assert pipeline.resolve_test(cfg, {"test": ""}).startswith(str(stages.PACKAGE))  # a marker from before


def test_the_vllm_generator_never_hands_vllm_a_gguf_file(monkeypatch, fake_dequantize):
    """Any caller (build-benchmark too): a GGUF model reaches vLLM's LLM as a temporary plain folder,
    removed when the engine is closed."""
    created = []

    class FakeLLM:
        def __init__(self, model, tokenizer, **kw):
            created.append((model, tokenizer))
            assert Path(model, "config.json").is_file() and not model.endswith(".gguf")

    from cwpo_ray import models

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(models, "load_tokenizer", lambda source, *a, **k: types.SimpleNamespace(
        save_pretrained=lambda folder: Path(folder, "tokenizer.json").write_text("{}")))
    gen = generation.VLLMGenerator("smollm2-135m", None, GenSettings())
    (model, tokenizer), = created
    assert model == tokenizer and len(fake_dequantize) == 1
    gen.close()
    assert not Path(model).exists()
