"""Ray job entry point: `cwpo train-policy` on the cluster this job was submitted to.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train_policy.py --config FILE.yaml [--flag value ...] [key=value ...]

Takes exactly the arguments of `cwpo train-policy` (see `cwpo train-policy --help`).
"""
import os
import sys

# The job's working_dir (the repo) on the path, for a cluster where the package is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cwpo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-policy", *sys.argv[1:]]))
