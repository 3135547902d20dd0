"""cwpo-ray: Confidence-Weighted Preference Optimization on Ray."""

import os

# Ray reads this when it is imported; without it Ray binds the machine's external interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
