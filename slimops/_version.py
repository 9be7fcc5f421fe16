"""The package version, written once (pyproject.toml reads it, `slimops --version` prints
it)."""

__version__ = "0.1.0"
