"""Estimate a tensor's size before allocating it, and refuse what will not fit."""

from __future__ import annotations

import os

import torch

from .errors import MemoryBudgetError

# Refuse dense allocations larger than this fraction of the memory available now.
_FRACTION = 0.5


def available_bytes() -> int:
    """Memory available to this process now (``MemAvailable``; physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError


def check_fits(n_elements: int, dtype: torch.dtype, what: str, alternative: str) -> None:
    """Raise `MemoryBudgetError` if `n_elements` of `dtype` exceed half of the memory available."""
    size = n_elements * torch.empty((), dtype=dtype).element_size()
    budget = available_bytes() * _FRACTION
    if size > budget:
        raise MemoryBudgetError(
            f"{what} would take {human(size)}, more than the {human(budget)} efffeat allows itself "
            f"(half of the memory available); {alternative}"
        )


# Automatic batch sizes: a power of two up to this, whose working memory fits in this fraction of what is free.
BATCH_CAP = 1024
_BATCH_FRACTION = 0.25


def batch_size_for(bytes_per_example: float, cap: int = BATCH_CAP) -> int:
    """The largest power of two ≤ `cap` whose batch needs at most a quarter of the memory available now.

    bytes_per_example: the estimated working memory of one example (at least 1). Powers of two keep the choice
    stable while the free memory moves a little; with memory to spare it is `cap`.
    """
    fits = int(available_bytes() * _BATCH_FRACTION // max(float(bytes_per_example), 1.0))
    size = 1
    while size * 2 <= min(fits, cap):
        size *= 2
    return size
