"""The version of tlkit: one place, read by the package, its checkpoints and pyproject.toml."""

__version__ = "0.1.0"
