"""The ``cwpo`` command: one subcommand per stage.

Each subcommand is a recipe module in ``cwpo_ray/recipes`` exposing ``Config`` (a
dataclass whose fields become the flags), ``run(cfg)`` and a docstring for ``--help``.
Only the chosen recipe is imported, so ``cwpo --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys
import typing

from cwpo_ray.config import ConfigError, unwrap_optional, load_config

# name -> (recipe module, one-line summary)
RECIPES: dict[str, tuple[str, str]] = {
    "data": ("cwpo_ray.recipes.data", "normalize a preference source into labeled / unlabeled / test tables"),
    "train-annotator": ("cwpo_ray.recipes.train_annotator", "train the weak Bradley-Terry annotator (Ray Train)"),
    "annotate": ("cwpo_ray.recipes.annotate", "label unlabeled pairs with the annotator and a confidence (Ray Data)"),
    "train-policy": ("cwpo_ray.recipes.train_policy", "SFT then confidence-weighted DPO / IPO / rDPO (Ray Train)"),
    "evaluate": ("cwpo_ray.recipes.evaluate", "gold reward accuracy of a policy against its SFT start"),
    "serve": ("cwpo_ray.recipes.serve", "serve the annotator over HTTP with dynamic batching (Ray Serve)"),
    "pipeline": ("cwpo_ray.recipes.pipeline", "run every stage for every arm, one MLflow parent run"),
    "preflight": ("cwpo_ray.recipes.preflight", "check the cluster for a pipeline config before running it"),
    "compare": ("cwpo_ray.recipes.compare", "table of arms x losses from MLflow, with intervals"),
    "build-benchmark": ("cwpo_ray.recipes.build_benchmark", "build the built-in benchmark tables"),
}


# What every stage imports. A Ray job on nodes without the project's dependencies (a bare Ray image
# submitted with jobs/runtime_env.yaml) would otherwise stop at the first import, in a traceback.
REQUIRED_MODULES = ("torch", "transformers", "mlflow", "pyarrow", "numpy", "yaml")


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    """The modules of ``names`` this Python cannot import (found without importing them)."""
    return [n for n in names if importlib.util.find_spec(n) is None]


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print a single line and exit 2 (argparse prints the whole usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> list[str]:
    """One flag per config field marked ``flag=True``; values stay strings until coerced.

    Fields of a nested settings group (e.g. ``dist.num_workers``) get a flag named by the
    field alone (``--num-workers``), so common settings read naturally on the command line.
    """
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            names += add_config_flags(parser, hints[f.name], prefix=f"{prefix}{f.name}.")
            continue
        tp, _ = unwrap_optional(hints[f.name])
        default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
            else f"default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
        help_text = f"{f.metadata.get('help', '')} ({default})"
        kwargs = dict(dest=prefix + f.name, default=None, help=help_text)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag_name(f.name), **kwargs)
        names.append(prefix + f.name)
    return names


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<16} {summary}" for name, (_, summary) in RECIPES.items())
    p = OneLineParser(
        prog="cwpo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Confidence-Weighted Preference Optimization on Ray.",
        epilog=f"subcommands:\n{lines}\n\nRun `cwpo SUBCOMMAND --help` for a stage's flags.",
    )
    p.add_argument("command", choices=list(RECIPES), metavar="SUBCOMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in RECIPES:
        _top_parser().parse_args([command])  # prints the one-line error, exits 2
    module_name, summary = RECIPES[command]
    if importlib.util.find_spec(module_name) is None:
        print(f"cwpo {command}: not built yet ({summary}); nothing was run", file=sys.stderr)
        return 3
    missing = missing_modules()
    if missing:
        print(f"cwpo {command}: this Python ({sys.executable}) lacks {', '.join(missing)}: install the project "
              "(pip install -e .), or on a Ray cluster whose nodes do not have it submit with "
              "--runtime-env jobs/runtime_env.pip.yaml", file=sys.stderr)
        return 3
    recipe = importlib.import_module(module_name)

    parser = OneLineParser(prog=f"cwpo {command}", description=recipe.__doc__,
                           epilog=getattr(recipe, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (flags and overrides win)")
    names = add_config_flags(parser, recipe.Config)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied last, e.g. train.lr=1e-5")
    args = parser.parse_args(rest)
    cfg = None
    try:
        cfg = load_config(recipe.Config, args.config, {n: getattr(args, n) for n in names}, args.overrides)
        code = recipe.run(cfg)
    except ConfigError as e:
        print(f"cwpo {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cwpo {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A full disk, however deep in Ray it was met, is one line: the folder, the need, the free space.
        from cwpo_ray.disk_space import command_error

        full = command_error(e, command, cfg)
        if full is None:
            raise
        stop_ray_logs()
        print(f"cwpo {command}: error: {full}", file=sys.stderr)
        return 2
    return int(code or 0)


def stop_ray_logs() -> None:
    """Disconnect from Ray if connected: the log lines of its failed workers would otherwise keep coming,
    after the one line that says what went wrong (Ray would be shut down at exit anyway)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
