import sys

from cwpo_ray.cli import main

sys.exit(main())
