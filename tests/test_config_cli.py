"""The config layering and the CLI's error contract: one line naming the problem, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
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
