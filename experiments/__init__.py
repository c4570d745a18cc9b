"""Kernel-work tools kept beside the product, not installed with it (pyproject.toml packages
only ``slabserve.*``): run them from the repository root as ``python -m experiments.NAME``.
What each is for: experiments/README.md."""
