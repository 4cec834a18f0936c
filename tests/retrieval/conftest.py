"""The tiny checkpoint and its exports live in tests/conftest.py (tests/serve uses them too)."""

from conftest import INDEX_CONFIGS, index_spec, train_tiny

__all__ = ["INDEX_CONFIGS", "index_spec", "train_tiny"]
