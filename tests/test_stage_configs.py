"""Each stage's settings are defined once, in the stage, and the pipeline reaches all of them.

The presets whose results are published (quick, full, the CPU cluster benchmark) must resolve to
the same per-stage settings as when they were measured: ``data/stage_configs_measured.json`` holds
what the pipeline handed each stage then (paths replaced by placeholders).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cwpo_ray.config import ConfigError, load_config
from cwpo_ray.recipes import annotate, data, evaluate, pipeline, train_annotator, train_policy
from cwpo_ray.orchestration import stages

REPO = Path(__file__).resolve().parent.parent
MEASURED = json.loads((Path(__file__).parent / "data" / "stage_configs_measured.json").read_text())
PRESETS = ["cwpo_ray/configs/quick.yaml", "cwpo_ray/configs/full_seed0.yaml", "jobs/configs/benchmark_cpu.yaml"]


def resolved_stage_configs(preset: str) -> dict:
    """What the pipeline hands each stage for ``preset`` (as dicts), with placeholder paths."""
    cfg = load_config(pipeline.Config, str(REPO / preset), overrides=["out=/OUT"])
    out = Path("/OUT")
    as_dict = dataclasses.asdict
    return {
        "data": as_dict(data.Config(**as_dict(cfg.data), source=stages.resolve_source(cfg.source),
                                    out=str(out / "data"), seed=cfg.seed, progress=False)),
        "annotator": as_dict(stages.annotator_config(cfg, "LABELED", out / "annotator", "")),
        "annotate": as_dict(annotate.Config(**as_dict(cfg.annotate), data="UNLABELED", annotator="ANN",
                                            out=str(out / "annotate"))),
        "sft": as_dict(stages.policy_config(cfg, data="LABELED", model="START", out="/OUT/sft", loss=cfg.losses[0],
                                              weighting="none", run_name="sft-shared", parent_run_id="PARENT")),
        "arm": as_dict(stages.policy_config(cfg, data="DATA", model="START", out="/OUT/arm/train", loss="dpo",
                                              weighting="confidence",
                                              sft_epochs=cfg.policy.sft_epochs if cfg.sft == "per-arm" else 0,
                                              run_name="train-arm", parent_run_id="RUN")),
        "evaluate": as_dict(stages.evaluation_config(cfg, "POLICY", "REF", "/TEST", out / "arms" / "a" / "eval",
                                                       "RUN")),
    }


# Settings that moved on purpose since the measurement; nothing else may differ.
MOVED = {
    # the pipeline now nests the annotator's MLflow run under its parent run
    ("annotator", "parent_run_id"),
    # a GGUF start is dequantized once by the pipeline; the stages get the plain folder
    ("sft", "gguf_file"), ("arm", "gguf_file"),
    # train-policy's checkpoint folder: still OUT/ray when empty, now a setting
    ("sft", "storage_path"), ("arm", "storage_path"),
    # the evaluation's resources, new settings (it was run in the driver)
    ("evaluate", "num_cpus"), ("evaluate", "num_gpus"),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_published_presets_resolve_to_the_measured_stage_settings(preset):
    # the snapshot was taken in another checkout: the repository's own path is a placeholder there
    now = json.loads(json.dumps(resolved_stage_configs(preset), default=str).replace(str(REPO), "<REPO>"))
    then = MEASURED[preset]
    sft_runs = load_config(pipeline.Config, str(REPO / preset)).sft == "shared"
    for stage_name, settings in then.items():
        if stage_name == "sft" and not sft_runs:
            continue  # the preset runs no SFT stage: its settings were never used
        for key, value in settings.items():
            if (stage_name, key) in MOVED:
                continue
            assert now[stage_name].get(key, "<gone>") == value, f"{preset}: {stage_name}.{key}"


def test_every_stage_option_is_reachable_from_the_pipeline():
    """The pipeline's sections are the stages' own Settings classes: same names, same defaults."""
    hints = {f.name: f.type for f in dataclasses.fields(pipeline.Config)}
    sections = {"data": data.Settings, "annotator": train_annotator.Settings, "annotate": annotate.Settings,
                "policy": train_policy.Settings, "evaluate": evaluate.Settings}
    cfg = pipeline.Config()
    for name, cls in sections.items():
        assert isinstance(getattr(cfg, name), cls), name
        assert getattr(cfg, name) == cls(), name  # the stage's defaults, not copies
        assert "Settings" in str(hints[name]), name
    # a stage's Config is its Settings plus inputs, outputs and bookkeeping
    for stage, settings in ((train_policy, train_policy.Settings), (train_annotator, train_annotator.Settings),
                            (annotate, annotate.Settings), (evaluate, evaluate.Settings), (data, data.Settings)):
        assert issubclass(stage.Config, settings)
    loaded = load_config(pipeline.Config, overrides=["policy.zero_stage=3", "policy.use_gpu=true",
                                                     "policy.lora_r=16", "annotate.gpus_per_actor=0.5",
                                                     "evaluate.num_gpus=1", "annotator.use_gpu=true"])
    assert loaded.policy.zero_stage == 3 and loaded.policy.use_gpu and loaded.policy.lora_r == 16
    assert loaded.annotate.gpus_per_actor == 0.5 and loaded.evaluate.num_gpus == 1 and loaded.annotator.use_gpu
    arm = stages.policy_config(loaded, data="D", model="M", out="/O", loss="dpo", weighting="none")
    assert arm.zero_stage == 3 and arm.use_gpu and arm.lora_r == 16


def test_a_pipeline_setting_the_policy_decides_is_refused_in_evaluate():
    with pytest.raises(ConfigError, match="policy.max_length"):
        load_config(pipeline.Config, overrides=["policy.max_length=96", "policy.max_prompt_length=48",
                                                      "evaluate.max_length=300"])
    ok = load_config(pipeline.Config, overrides=["policy.max_length=96", "policy.max_prompt_length=48",
                                                 "evaluate.max_length=96"])
    assert stages.evaluation_config(ok, "P", "R", "/T", Path("/O/arms/a/eval"), "").max_length == 96


def test_the_gpu_preset_is_accepted_and_asks_for_gpus():
    cfg = load_config(pipeline.Config, str(REPO / "jobs/configs/hh_pipeline_gpu.yaml"))
    assert cfg.annotator.use_gpu and cfg.annotate.gpus_per_actor > 0 and cfg.evaluate.num_gpus >= 1
    assert cfg.policy.use_gpu and cfg.policy.strategy == "deepspeed"
    assert cfg.policy.lora and cfg.policy.zero_stage == 2  # LoRA: the frozen weights fit a GPU, no ZeRO-3 gathers
    assert cfg.policy.mixed_precision == "auto"  # bf16 on GPUs that have it
    assert cfg.source.startswith("hh-rlhf:")


def test_the_measurement_preset_chooses_nothing_on_test_prompts():
    """full.yaml is the measurement: a validation split, the annotator's epochs and temperature chosen
    out-of-fold, several seeds, and no setting tagged as chosen on test prompts, on gold accuracy or
    pinned to the older protocol (those tags live in full_seed0.yaml and quick.yaml)."""
    text = (REPO / "cwpo_ray" / "configs" / "full.yaml").read_text()
    for tag in ("[test]", "[gold-unlabeled]", "[pinned]"):
        assert tag not in text, tag
    cfg = load_config(pipeline.Config, str(REPO / "cwpo_ray" / "configs" / "full.yaml"))
    cfg.validate()
    assert cfg.data.validation_fraction > 0 and cfg.evaluate.split == "test"
    assert cfg.annotator.folds > 1 and cfg.annotator.calibration == "temperature"
    assert len(cfg.seed_list()) >= 3 and {"human", "ws", "cw", "cw_raw"} <= set(cfg.arms)
