"""The errors efffeat raises. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class EfffeatError(Exception):
    """Base class of every error efffeat raises on purpose."""


class ConfigError(EfffeatError, ValueError):
    """An argument has a value efffeat does not know (an order name, a readout, a group...)."""


class MissingDependencyError(ConfigError, ImportError):
    """An optional package a call needs is not installed; the message names the ``pip install`` that adds it."""


class InitStateError(EfffeatError, KeyError):
    """The init state dict does not match the model (missing or extra keys, shapes that differ)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(EfffeatError, ValueError):
    """NaN or inf in parameters, the init state or the inputs."""


class DataError(EfffeatError, ValueError):
    """The data is empty, malformed, or rejected by the model."""


class ReadoutError(EfffeatError, ValueError):
    """The readout returned something that is not a differentiable [N] or [N, K] tensor."""


class UnsupportedModelError(EfffeatError, TypeError):
    """A model or layer efffeat cannot compute features for (e.g. train-mode batch norm or dropout)."""


class MemoryBudgetError(EfffeatError, MemoryError):
    """A requested dense tensor would not fit in memory; the message names the size and the alternative."""


class FeatureIdError(EfffeatError, KeyError):
    """A feature id that does not exist; the message suggests close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SaveFileError(EfffeatError, OSError):
    """A save file that is corrupt, truncated, or written by an incompatible format version."""
