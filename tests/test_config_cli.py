"""The config layering and the CLI's error contract: one line naming the problem, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from cwpo_ray.cli import RECIPES, main
from cwpo_ray.config import ConfigError, load_config, option


@dataclass
class Inner:
    lr: float = option(1e-5, "learning rate")
    stage: int = option(2, "ZeRO stage")


@dataclass
class Example:
    data: str = option(help="input table", must_exist=True)
    epochs: int = option(5, "epochs")
    fraction: float = option(0.3, "fraction")
    name: Optional[str] = option(None, "name")
    losses: list[str] = option(help="losses", factory=lambda: ["dpo"])
    fast: bool = option(False, "fast mode")
    inner: Inner = option(help="nested", factory=Inner)

    def validate(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")


def test_layering_defaults_yaml_flags_overrides(tmp_path):
    data = tmp_path / "x.parquet"
    data.write_text("")
    yml = tmp_path / "c.yaml"
    yml.write_text(f"data: {data}\nepochs: 3\ninner:\n  lr: 2e-5\nlosses: [dpo, ipo]\n")
    cfg = load_config(Example, str(yml), {"epochs": "4", "fast": True}, ["inner.stage=3", "name=run1", "fraction=0.5"])
    assert cfg.epochs == 4 and cfg.fast is True and cfg.name == "run1" and cfg.fraction == 0.5
    assert cfg.inner == Inner(lr=2e-5, stage=3)
    assert cfg.losses == ["dpo", "ipo"]
    assert load_config(Example, None, {"data": str(data)}, ["losses=dpo,rdpo"]).losses == ["dpo", "rdpo"]


@pytest.mark.parametrize("override, message", [
    (["epochs=three"], "epochs: expected int, got 'three'"),
    (["inner.lr=fast"], "inner.lr: expected float"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["inner.bogus=1"], "unknown key 'inner.bogus'"),
    (["fraction=1.5"], "fraction must be in (0, 1)"),
    (["epochs"], "not of the form key=value"),
    (["fast=maybe"], "fast: expected bool"),
])
def test_config_errors_name_the_key(tmp_path, override, message):
    data = tmp_path / "x.parquet"
    data.write_text("")
    with pytest.raises(ConfigError) as e:
        load_config(Example, None, {"data": str(data)}, override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_input_file_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="data: file not found: .*nope.parquet"):
        load_config(Example, None, {"data": str(tmp_path / "nope.parquet")})
    with pytest.raises(ConfigError, match="missing required setting data"):
        load_config(Example, None, {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Example, str(tmp_path / "missing.yaml"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cwpo_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_top_level_help_lists_every_subcommand():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in RECIPES:
        assert name in r.stdout


def test_cli_unknown_subcommand_is_one_line_exit_2():
    r = run_cli("bogus")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "bogus" in r.stderr


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = run_cli("data", "--source", f"pairs:{tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "missing.jsonl" in r.stderr
    r = run_cli("data", "--source", "pairs:x", "--out", str(tmp_path), "seed=abc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "seed" in r.stderr
    r = run_cli("data", "--bogus-flag", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--bogus-flag" in r.stderr
    r = run_cli("data", "--source", "pairs:x", "--out", str(tmp_path), "bogus_key=1")
    assert r.returncode == 2 and "bogus_key" in r.stderr


def test_unbuilt_subcommand_says_so(monkeypatch, capsys):
    monkeypatch.setitem(RECIPES, "future", ("cwpo_ray.recipes.does_not_exist", "a future stage"))
    assert main(["future"]) != 0
    assert "not built yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------- placeholders, job paths

@pytest.mark.parametrize("value", ["s3://YOUR-BUCKET/cwpo/ray", "fs-XXXXXXXX.efs.us-east-1.amazonaws.com:/",
                                   "gs://your-ok/YOUR_PROJECT/x", "CHANGE-ME"])
def test_a_placeholder_in_a_config_is_refused_with_one_line(tmp_path, value, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text(f"source: 'pairs:{value}'\nout: {tmp_path / 'o'}\n")
    assert main(["data", "--config", str(yml)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source:" in err and "placeholder" in err and str(yml) in err
    assert not (tmp_path / "o").exists()  # refused before the stage ran


def test_a_placeholder_is_found_in_nested_sections_and_lists_and_can_be_overridden(tmp_path):
    data = tmp_path / "x.parquet"
    data.write_text("")
    yml = tmp_path / "c.yaml"
    yml.write_text(f"data: {data}\nlosses: [dpo, YOUR-LOSS]\n")
    with pytest.raises(ConfigError, match=r"losses\[1\]: 'YOUR-LOSS' .*placeholder"):
        load_config(Example, str(yml))
    yml.write_text(f"data: {data}\nname: s3://YOUR-BUCKET/x\n")
    with pytest.raises(ConfigError, match="name: .*placeholder"):
        load_config(Example, str(yml))
    # An override on the command line fills the placeholder in.
    assert load_config(Example, str(yml), None, ["name=s3://real-bucket/x"]).name == "s3://real-bucket/x"


def test_no_shipped_config_holds_a_placeholder():
    """The configs users submit as they are (jobs/configs, the package presets) are free of placeholders;
    the cluster files keep theirs (YOUR-PROJECT-ID, fs-XXXXXXXX), which `ray up` / the mount refuse."""
    import yaml

    from cwpo_ray.config import check_placeholders

    repo = Path(__file__).resolve().parent.parent
    files = sorted((repo / "jobs" / "configs").glob("*.yaml")) + sorted((repo / "cwpo_ray" / "configs").glob("*.yaml"))
    assert files
    for f in files:
        check_placeholders(yaml.safe_load(f.read_text()), str(f))


@dataclass
class Outputs:
    out: str = option("runs/x", "output folder")
    cache_dir: str = option("", "cache")
    inner: Inner = option(help="nested", factory=Inner)


def test_relative_output_paths_are_refused_in_a_ray_job_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert load_config(Outputs).out == "runs/x"  # a local command: relative to where it runs
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # as Ray's job supervisor sets it
    with pytest.raises(ConfigError) as e:
        load_config(Outputs)
    assert str(e.value).startswith("out: 'runs/x' is a relative path") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cache_dir: 'cache' is a relative path"):
        load_config(Outputs, None, {"out": str(tmp_path)}, ["cache_dir=cache"])
    assert load_config(Outputs, None, {"out": str(tmp_path)}, ["cache_dir=s3://b/c"]).cache_dir == "s3://b/c"


def test_a_pipeline_job_with_a_relative_out_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "out=runs/p"]) == 2
    err = capsys.readouterr().err
    assert "out: 'runs/p' is a relative path" in err and not (tmp_path / "runs").exists()
    assert main(["pipeline", f"out={tmp_path / 'p'}", "annotator.storage_path=ray"]) == 2
    assert "annotator.storage_path: 'ray' is a relative path" in capsys.readouterr().err


def test_missing_dependencies_stop_with_one_line(monkeypatch, capsys):
    from cwpo_ray import cli

    assert cli.missing_modules(("yaml", "no_such_module_xyz")) == ["no_such_module_xyz"]
    monkeypatch.setattr(cli, "missing_modules", lambda names=cli.REQUIRED_MODULES: ["torch", "mlflow"])
    assert main(["data", "--help"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch, mlflow" in err and "jobs/runtime_env.pip.yaml" in err
