"""Running efffeat past one process: the data split across the ranks of ``torch.distributed``.

The same script runs on every process, launched by ``torchrun``; each rank computes the effective features of
its shard of the data, and the functions here combine the shards (gloo on CPUs, NCCL on GPUs)::

    # torchrun --nproc-per-node 4 analyse.py        (one machine; add --nnodes/--rdzv-endpoint for several)
    import efffeat as ef
    from efffeat import distributed as dist

    dist.init()                                      # process group from torchrun's environment
    dual = ef.DualModel(model, init=init_state)      # the same model on every rank
    feats = dist.features(dual, x)                   # this rank's rows of the whole dataset x
    table = dist.rank(feats, by="contribution", group="neuron")   # the table of the whole dataset, every rank
    K = dist.kernel(feats, dst=0)                    # [N, N] on rank 0 (None elsewhere)

Sharding: a tensor or ``(inputs, targets)`` tuple is split into contiguous blocks of rows, rank r taking
block r, so the global example order is the data's own; any other iterable is taken as this rank's own
batches (e.g. a ``DataLoader`` over a ``DistributedSampler``) and the global order is the ranks' shards
concatenated in rank order. Every collective must be called by every rank, in the same order.

Reductions over examples (`sq_sums`, `rmatvec`, `rank`) all-reduce per-rank partial sums; `kernel` gathers
the factors (``O(N·(d_in + d_out))``, far smaller than the kernel) so each rank computes its block of rows,
then gathers the blocks; `max_activating` merges per-rank top-k lists (`merge_topk`). Without an initialised
process group every function works on one process (world size 1). `kernel_to_disk` writes kernels larger
than memory to a ``.npy`` file in blocks of rows (each rank its own rows), readable as a ``numpy.memmap``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor

from ._check import positive_int
from .dual import DualModel
from .errors import ConfigError, DataError
from .factors import gather_examples
from .features import EffectiveFeatures

# Bytes of kernel rows `kernel_to_disk` computes at once when no block size is given.
_BLOCK_BYTES = 256 << 20


# ---- the process group ---------------------------------------------------------------------------------
def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns ``(rank, world_size)``.

    backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default NCCL when CUDA is available, else gloo. With NCCL
    the current CUDA device is set to ``LOCAL_RANK``. Does nothing if the group already exists.
    """
    if not td.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; install a build with distributed support")
    if not td.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "no process group to join: launch the script with torchrun (e.g. torchrun --nproc-per-node 2 "
                "script.py), which sets RANK, WORLD_SIZE and MASTER_ADDR"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend=backend)
    return td.get_rank(), td.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` when no process group is initialised."""
    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def _collective() -> bool:
    return world()[1] > 1


def barrier() -> None:
    if _collective():
        td.barrier()


# ---- sharding ----------------------------------------------------------------------------------------------
def shard_range(n: int) -> range:
    """Rows ``[start, stop)`` of an ``n``-example dataset owned by this rank (contiguous, balanced blocks)."""
    rank, size = world()
    if n < size:
        raise DataError(f"{n} examples cannot be split across {size} processes; use fewer processes or more data")
    return range(rank * n // size, (rank + 1) * n // size)


def shard(data: Any) -> Any:
    """This rank's part of `data`: a block of rows of a tensor / ``(inputs, targets)`` tuple; else `data`."""
    if isinstance(data, Tensor) and data.ndim:
        rows = shard_range(data.shape[0])
        return data[rows.start : rows.stop]
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) and t.ndim for t in data):
        rows = shard_range(data[0].shape[0])
        return tuple(t[rows.start : rows.stop] for t in data)
    return data


def features(dual: DualModel, data: Any, batch_size: int = 256, order: str | None = None) -> EffectiveFeatures:
    """The effective features of this rank's shard of `data` (see the module docstring for the sharding)."""
    return dual.features(shard(data), batch_size=batch_size, order=order)


def example_offset(n_local: int) -> int:
    """Global index of this rank's first example: the example counts of the lower ranks, summed."""
    counts = _all_gather_varying(torch.tensor([n_local], device=_device()))
    return int(sum(int(c[0]) for c in counts[: world()[0]]))


# ---- reductions ---------------------------------------------------------------------------------------------
def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks (a new tensor; `t` itself is unchanged)."""
    out = t.clone()
    if _collective():
        td.all_reduce(out, op=td.ReduceOp.SUM)
    return out


def n_examples(feats: EffectiveFeatures) -> int:
    """N, the number of examples over every rank."""
    return int(all_reduce_sum(torch.tensor(feats.n_examples, device=feats.device)))


def sq_sums(feats: EffectiveFeatures, weights: Tensor | None = None) -> Tensor:
    """``[P]``: ``Σ_{x,k} w φ^E_μ²`` over every rank's examples; `weights` are this rank's ``[n(, K)]``."""
    return all_reduce_sum(feats.sq_sums(weights))


def rmatvec(feats: EffectiveFeatures, u: Tensor) -> Tensor:
    """``[P]``: ``Σ_{x(,k)} u φ^E_μ`` over every rank's examples; `u` is this rank's ``[n(, K)]``."""
    return all_reduce_sum(feats.rmatvec(u))


class _GlobalSums:
    """Sharded features seen as the whole dataset's, for the reductions `efffeat.ranking` takes from them.

    ``n_examples`` is the global N; ``sq_sums``/``rmatvec`` take global ``[N(, K)]`` weights (this rank uses
    its rows) and return all-reduced ``[P]`` sums. Nothing per-example is offered.
    """

    def __init__(self, local: EffectiveFeatures):
        self.local = local
        self.n_examples = n_examples(local)
        start = example_offset(local.n_examples)
        self.rows = slice(start, start + local.n_examples)
        for name in ("ids", "slots", "meta", "order", "scalar", "n_outputs", "n_features", "dtype", "device"):
            setattr(self, name, getattr(local, name))

    def flat_delta(self) -> Tensor:
        return self.local.flat_delta()

    def sq_sums(self, weights: Tensor | None = None) -> Tensor:
        return sq_sums(self.local, None if weights is None else weights[self.rows])

    def rmatvec(self, u: Tensor) -> Tensor:
        return rmatvec(self.local, u[self.rows])


def rank(feats: EffectiveFeatures, by: str = "contribution", group: Any = "param", top: int | None = None, **kw):
    """`efffeat.ranking.rank` of the whole dataset from sharded features; every rank gets the same table.

    The scores come from all-reduced partial sums. ``by="learned"`` needs the per-example difference of two
    feature sets and is not available on shards: rank ``gather_features(feats)`` locally instead.
    """
    from .ranking import rank as rank_local

    if by == "learned":
        raise ConfigError("by='learned' is not available on sharded features; gather them with gather_features()")
    return rank_local(_GlobalSums(feats), by=by, group=group, top=top, **kw)  # type: ignore[arg-type]


# ---- gathering ----------------------------------------------------------------------------------------------
def _device() -> torch.device:
    if _collective() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shapes(t: Tensor) -> list[tuple[int, ...]]:
    """Every rank's shape of `t` (same ndim on every rank)."""
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(td.get_world_size())]
    td.all_gather(shapes, shape)
    return [tuple(int(d) for d in s) for s in shapes]


def _padded(t: Tensor, shapes: list[tuple[int, ...]]) -> Tensor:
    """`t` zero-padded to the largest of `shapes` in every dimension (collectives need equal sizes)."""
    out = t.new_zeros(tuple(max(s[i] for s in shapes) for i in range(t.ndim)))
    out[tuple(slice(0, d) for d in t.shape)] = t
    return out


def _trimmed(parts: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    return [p[tuple(slice(0, d) for d in s)] for p, s in zip(parts, shapes)]


def _all_gather_varying(t: Tensor) -> list[Tensor]:
    """Every rank's `t` (same ndim; sizes may differ), in rank order, on every rank."""
    if not _collective():
        return [t]
    shapes = _shapes(t)
    padded = _padded(t, shapes)
    out = [torch.empty_like(padded) for _ in shapes]
    td.all_gather(out, padded)
    return _trimmed(out, shapes)


def _gather_varying(t: Tensor, dst: int) -> list[Tensor] | None:
    """Every rank's `t` on rank `dst` (rank order; sizes may differ); None on the other ranks."""
    if not _collective():
        return [t]
    shapes = _shapes(t)
    padded = _padded(t, shapes)
    if td.get_rank() != dst:
        td.gather(padded, None, dst=dst)
        return None
    out = [torch.empty_like(padded) for _ in shapes]
    td.gather(padded, out, dst=dst)
    return _trimmed(out, shapes)


def _any_true(flag: bool) -> bool:
    if not _collective():
        return flag
    t = torch.tensor(int(flag), device=_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t)


def gather_features(feats: EffectiveFeatures) -> EffectiveFeatures:
    """The features of every rank's examples, concatenated in rank order, on every rank."""
    if not _collective():
        return feats
    factors = {name: gather_examples(f, _all_gather_varying, _any_true) for name, f in feats.factors.items()}
    z_init = torch.cat(_all_gather_varying(feats.z_init))
    z_trained = torch.cat(_all_gather_varying(feats.z_trained))
    return EffectiveFeatures(
        factors, feats.ids, feats.delta, z_init, z_trained, feats.order, feats.scalar, dict(feats.meta)
    )


def kernel(feats: EffectiveFeatures, params: Sequence[str] | None = None, dst: int | None = None) -> Tensor | None:
    """The effective kernel of the whole dataset: ``[N, N]`` (scalar readout) or ``[N, K, N, K]``.

    Each rank computes its block of rows against every example (the factors are gathered first); the
    blocks are then gathered to every rank (``dst=None``) or to rank `dst` only (the others get None).
    """
    every = gather_features(feats)
    block = feats.kernel(every, params=params)
    if dst is None:
        return torch.cat(_all_gather_varying(block))
    parts = _gather_varying(block, dst)
    return None if parts is None else torch.cat(parts)


# ---- top-k ----------------------------------------------------------------------------------------------
def merge_topk(values: Tensor, indices: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """The best `k` of candidate rows: ``values [m, ...]`` with global example ``indices [m, ...]``.

    Ties go to the smaller example index, so merging per-shard top-k lists gives exactly the top-k of the
    whole dataset. Returns ``(values [min(k, m), ...], indices [min(k, m), ...])`` sorted best first.
    """
    positive_int("k", k)
    if indices.shape != values.shape:
        indices = indices.reshape(indices.shape + (1,) * (values.ndim - indices.ndim)).expand(values.shape)
    by_index = torch.sort(indices, dim=0, stable=True).indices
    v, i = values.gather(0, by_index), indices.gather(0, by_index)
    best = torch.sort(v, dim=0, descending=largest, stable=True).indices[:k]
    return v.gather(0, best), i.gather(0, best)


def all_gather_topk(values: Tensor, indices: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """`merge_topk` of every rank's candidates (``values [k_r, ...]``, global ``indices``); same on every rank."""
    if indices.shape != values.shape:
        indices = indices.reshape(indices.shape + (1,) * (values.ndim - indices.ndim)).expand(values.shape)
    vs, is_ = _all_gather_varying(values.contiguous()), _all_gather_varying(indices.contiguous())
    return merge_topk(torch.cat(vs), torch.cat(is_), k, largest)


def max_activating(dual: DualModel, data: Any, features: Any, k: int = 16, **kwargs: Any):
    """`efffeat.search.max_activating` over the whole dataset: each rank searches its shard, the per-rank
    top-k lists are merged. Every rank gets the same `TopK`, with global example indices; `k` must not
    exceed one rank's share of the data. Keyword arguments are passed on (``by``, ``largest``, ...).
    """
    from .search import TopKEntry
    from .search import max_activating as search_local

    local = search_local(dual, shard(data), features, k=k, **kwargs)
    n_local, n_out, largest = local.meta["n_examples"], local.meta["n_outputs"], local.meta["largest"]
    offset = example_offset(n_local)
    entries = {}
    for label, e in local.entries.items():
        pairs = (e.indices + offset) * n_out + (0 if e.components is None else e.components)
        values, pairs = all_gather_topk(e.values, pairs, k, largest)
        entries[label] = TopKEntry(pairs // n_out, values, None if e.components is None else pairs % n_out)
    total = int(all_reduce_sum(torch.tensor(n_local, device=_device())))
    return dataclasses.replace(local, entries=entries, meta={**local.meta, "n_examples": total})


# ---- kernels larger than memory ----------------------------------------------------------------------------
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def kernel_to_disk(
    dual: DualModel,
    data: Any,
    path: str | os.PathLike,
    block: int | None = None,
    batch_size: int = 256,
    params: Sequence[str] | None = None,
) -> np.memmap:
    """Write the effective kernel ``[N, N]`` (or ``[N, K, N, K]``) of `data` to a ``.npy`` file, by row blocks.

    Only the factored features and one block of ``block`` rows are in memory at a time; the kernel itself
    lives on disk. With several processes each rank computes and writes its own rows (the file must be on a
    filesystem every rank sees). The file appears under `path` only when complete (it is written beside it,
    then renamed). Returns it opened as a read-only ``numpy.memmap`` (``np.load(path, mmap_mode="r")``
    reopens it later).

    block: rows per step (default: as many as fit in 256 MiB); params: restrict to these parameter tensors.
    """
    local = features(dual, data, batch_size)
    every = gather_features(local)
    start = example_offset(local.n_examples)
    n, k = every.n_examples, every.n_outputs
    shape = (n, n) if local.scalar else (n, k, n, k)
    dtype = _NUMPY.get(local.dtype, np.float32)
    row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    if block is None:
        block = max(1, _BLOCK_BYTES // row_bytes)
    positive_int("block", block)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    if world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape).flush()
    barrier()
    data_offset = np.load(partial, mmap_mode="r").offset  # the .npy header's length
    # Plain positional writes (not a writable memmap) keep resident memory at one block.
    with open(partial, "r+b") as fh:
        for s in range(0, local.n_examples, block):
            rows = local.select_rows(slice(s, s + block)).kernel(every, params=params)
            fh.seek(data_offset + (start + s) * row_bytes)
            fh.write(np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=dtype).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    barrier()
    if world()[0] == 0:
        os.replace(partial, path)
    barrier()
    return np.load(path, mmap_mode="r")


__all__ = [
    "all_gather_topk",
    "all_reduce_sum",
    "barrier",
    "example_offset",
    "features",
    "gather_features",
    "init",
    "kernel",
    "kernel_to_disk",
    "max_activating",
    "merge_topk",
    "n_examples",
    "rank",
    "rmatvec",
    "shard",
    "shard_range",
    "sq_sums",
    "world",
]
