"""cwpo-ray: Confidence-Weighted Preference Optimization on Ray."""

__version__ = "0.1.0"
