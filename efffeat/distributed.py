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

Sharding: a tensor, an ``(inputs, targets)`` tuple or a dict of tensors (``model(**batch)``) is split into
contiguous blocks of rows, rank r taking block r, so the global example order is the data's own; any other
iterable is taken as this rank's own batches (e.g. a ``DataLoader`` over a ``DistributedSampler``) and the
global order is the ranks' shards concatenated in rank order. Every collective must be called by every rank,
in the same order.

A model's ``order="auto"`` is decided once, by rank 0 on its shard's first batch (the dataset's first
examples, as on one process), and broadcast: every rank computes the same order with the same nodes.

Reductions over examples (`sq_sums`, `rmatvec`, `rank`) all-reduce per-rank partial sums; `kernel` gathers
the factors (``O(N·(d_in + d_out))``, far smaller than the kernel) so each rank computes its block of rows,
then gathers the blocks; `max_activating` merges per-rank top-k lists (`merge_topk`). Without an initialised
process group every function works on one process (world size 1). `kernel_to_disk` writes kernels larger
than memory to a ``.npy`` file in blocks of rows (each rank its own rows), readable as a ``numpy.memmap``.

Failures: when one rank's features fail with an efffeat error (NaN in its shard, data the model rejects), every
rank raises it, naming the rank and — for sharded tensors — the example's global index, instead of leaving the
others waiting. A rank that stops answering (killed, frozen) makes the others' next collective fail after the
process group's timeout (`init`'s ``timeout``, five minutes by default).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor

from . import errors
from ._atomic import commit, discard, new_temp
from ._check import positive_int, real
from .dual import DualModel
from .errors import ConfigError, DataError, EfffeatError, SaveFileError
from .factors import gather_examples
from .features import EffectiveFeatures

# Bytes of kernel rows `kernel_to_disk` computes at once when no block size is given.
_BLOCK_BYTES = 256 << 20

# Seconds a collective waits for the other ranks before it fails (torch's own default is 30 minutes).
DEFAULT_TIMEOUT = 300.0

T = TypeVar("T")


# ---- the process group ---------------------------------------------------------------------------------
def init(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns ``(rank, world_size)``.

    backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default NCCL when CUDA is available, else gloo. With NCCL
    the current CUDA device is set to ``LOCAL_RANK``. timeout: seconds a collective waits for the other
    ranks before it fails (default five minutes): a rank that died or froze stops the others after this long.
    Does nothing if the group already exists (its timeout stays as it was set).
    """
    seconds = real("timeout", timeout, 0, strict=True)
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
        td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
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


def _rows(data: Any) -> int | None:
    """Examples of data that is sharded by rows (a tensor, a tuple or a dict of tensors), else None."""
    if isinstance(data, Tensor) and data.ndim:
        return data.shape[0]
    parts = list(data.values()) if isinstance(data, dict) else data if isinstance(data, tuple) else []
    if parts and all(isinstance(t, Tensor) and t.ndim for t in parts):
        return parts[0].shape[0]
    return None


def shard(data: Any) -> Any:
    """This rank's part of `data`: a block of rows of a tensor, an ``(inputs, targets)`` tuple or a dict of
    tensors; any other data (an iterable of batches) is this rank's own and returned as it is."""
    n = _rows(data)
    if n is None:
        return data
    rows = shard_range(n)
    if isinstance(data, Tensor):
        return data[rows.start : rows.stop]
    if isinstance(data, dict):
        return {key: t[rows.start : rows.stop] for key, t in data.items()}
    return tuple(t[rows.start : rows.stop] for t in data)


def shard_start(data: Any) -> int | None:
    """Global index of this rank's first example of `data` when it is sharded by rows (None for an iterable)."""
    n = _rows(data)
    return None if n is None else shard_range(n).start


def agree_order(dual: DualModel, data: Any, batch_size: int | None = None) -> str:
    """The dual model's order on every rank: ``"auto"`` is decided by rank 0 on its shard of `data` and
    broadcast (order, nodes, reason, residual), so that no two ranks compute different orders."""
    from .dual import AUTO

    if dual.order != AUTO:
        return dual.order
    decided = on_every_rank(lambda: dual.resolve_order(shard(data), batch_size) if world()[0] == 0 else None)
    if _collective():
        message = [(dual.order, dual.nodes, dual.order_reason, dual.order_completeness) if decided else None]
        td.broadcast_object_list(message, src=0)
        dual.order, dual.nodes, reason, dual.order_completeness = message[0]  # type: ignore[misc]
        dual.order_reason = reason if world()[0] == 0 else f"{reason} (decided on rank 0)"
    return dual.order


def features(dual: DualModel, data: Any, batch_size: int = 256, order: str | None = None) -> EffectiveFeatures:
    """The effective features of this rank's shard of `data` (see the module docstring for the sharding).

    If any rank fails (an efffeat error, e.g. NaN in its shard), every rank raises it (`on_every_rank`).
    """
    if order is None:
        agree_order(dual, data, batch_size)
    local = shard(data)
    return on_every_rank(lambda: dual.features(local, batch_size=batch_size, order=order), shard_start(data))


def on_every_rank(compute: Callable[[], T], start: int | None = None) -> T:
    """This rank's part of a step that every rank takes: its result, or the error of the first rank that failed.

    An efffeat error on any rank is raised on every rank (its type and message, naming the rank); an example
    index in it is made global with `start`, the failing rank's first global example index (None: the rank's
    own data, an iterable, where indices stay local). Must be called by every rank, like any collective.
    """
    rank, size = world()
    error: EfffeatError | None = None
    try:
        result = compute()
    except EfffeatError as e:
        error = e
    if size == 1:
        if error is not None:
            raise error
        return result
    if not _any_true(error is not None):
        return result
    mine = None if error is None else (type(error).__name__, _global_message(str(error), rank, size, start))
    every: list[Any] = [None] * size
    td.all_gather_object(every, mine)
    first = next(r for r, e in enumerate(every) if e is not None)
    name, message = every[first]
    cls = getattr(errors, name, None)
    cls = cls if isinstance(cls, type) and issubclass(cls, EfffeatError) else DataError
    raise cls(message) from error


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

    def group_contribution_sq_sums(self, pos: Tensor, gid: Tensor, n_groups: int) -> Tensor:
        return all_reduce_sum(self.local.group_contribution_sq_sums(pos, gid, n_groups))


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


_EXAMPLE = re.compile(r"\bexample (\d+)\b")


def _global_message(message: str, rank: int, size: int, start: int | None) -> str:
    """`message` of rank `rank`'s error, its first example index made global (rank-local data: kept)."""
    if start is not None:
        message = _EXAMPLE.sub(lambda m: f"example {int(m[1]) + start}", message, count=1)
    where = f"rank {rank} of {size}" + (f", whose shard starts at global example {start}" if start else "")
    return f"{message} ({where})"


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

    if kwargs.get("order") is None:
        agree_order(dual, data, kwargs.get("batch_size"))
    part = shard(data)
    local = on_every_rank(lambda: search_local(dual, part, features, k=k, **kwargs), shard_start(data))
    n_local, n_out, largest = local.meta["n_examples"], local.meta["n_outputs"], local.meta["largest"]
    offset = example_offset(n_local)
    entries = {}
    for label, e in local.entries.items():
        pairs = (e.indices + offset) * n_out + (0 if e.components is None else e.components)
        values, pairs = all_gather_topk(e.values, pairs, k, largest)
        n_zero = int(all_reduce_sum(torch.tensor(e.n_zero, device=_device())))
        entries[label] = TopKEntry(pairs // n_out, values, None if e.components is None else pairs % n_out, n_zero)
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
    tmp, data_offset = _new_kernel_file(path, dtype, shape)
    first = world()[0] == 0

    def rename() -> None:
        if first:
            try:
                commit(tmp, path)
            except OSError as e:
                raise SaveFileError(f"could not write {path} ({e}); check the directory is writable") from e

    try:  # each step ends with every rank agreeing it went well: the rows are all on disk before the rename
        on_every_rank(lambda: _write_rows(local, every, tmp, data_offset + start * row_bytes, block, dtype, params))
        on_every_rank(rename)
    except BaseException:
        if first:
            discard(tmp)
        raise
    return np.load(path, mmap_mode="r")


def _new_kernel_file(path: Path, dtype: Any, shape: tuple[int, ...]) -> tuple[Path, int]:
    """A new temporary ``.npy`` file beside `path` with the header of a `shape` array and room for its data, and
    where the data starts. Rank 0 creates it (a unique name, `efffeat._atomic.new_temp`) and names it to all."""
    made: list[Any] = [None]
    if world()[0] == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = new_temp(path)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            with _open_existing(tmp) as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                offset = fh.tell()
                fh.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
            made[0] = (str(tmp), offset)
        except OSError as e:
            made[0] = f"could not create the kernel file beside {path} ({e}); check the directory is writable"
    if _collective():
        td.broadcast_object_list(made, src=0)
    if isinstance(made[0], str):
        raise SaveFileError(made[0])
    return Path(made[0][0]), made[0][1]


def _open_existing(path: Path):
    """`path` opened for reading and writing without creating it or following a symlink there."""
    return open(os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)), "r+b")


def _write_rows(
    local: EffectiveFeatures,
    every: EffectiveFeatures,
    tmp: Path,
    at: int,
    block: int,
    dtype: Any,
    params: Sequence[str] | None,
) -> None:
    """Write this rank's kernel rows into the file `tmp` from byte `at` on, `block` rows at a time."""
    try:
        # Plain sequential writes (not a writable memmap) keep resident memory at one block.
        with _open_existing(tmp) as fh:
            fh.seek(at)
            for s in range(0, local.n_examples, block):
                rows = local.select_rows(slice(s, s + block)).kernel(every, params=params)
                fh.write(np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=dtype).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise SaveFileError(f"could not write the kernel rows to {tmp} ({e}); check the disk has space") from e


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
    "on_every_rank",
    "rank",
    "rmatvec",
    "shard",
    "shard_range",
    "shard_start",
    "sq_sums",
    "world",
]
