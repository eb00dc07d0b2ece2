"""Benchmarks that print JSON (see README: Performance)."""

import models  # noqa: F401  (OpenMP's wait policy, before anything loads PyTorch: models/__init__.py)
