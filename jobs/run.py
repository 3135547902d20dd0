"""Ray job entry point for every stage: `cwpo STAGE ...` on the cluster this job was submitted to.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py STAGE --config FILE.yaml [--flag value ...] [key=value ...]

STAGE is any `cwpo` subcommand (pipeline, data, train-annotator, annotate, train-policy, evaluate,
serve, compare, preflight, build-benchmark; `_` works for `-`), with exactly its arguments
(`python jobs/run.py STAGE --help`).
"""
import os
import sys

# The job's working_dir (the repo) on the path, for a cluster where the package is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cwpo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(main(["--help"]))
    sys.exit(main([sys.argv[1].replace("_", "-"), *sys.argv[2:]]))
