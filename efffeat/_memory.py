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
