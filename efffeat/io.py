"""Saving and loading efffeat results: one safetensors file per object, written atomically, checked on load.

File layout (a standard ``.safetensors`` file, readable by any safetensors reader):

- the tensors of the object's state, stored bit-exactly (dtype, shape, values);
- ``__metadata__``: ``format = "efffeat"``, ``format_version``, ``type`` (the registered import path of the
  object's class, e.g. ``"efffeat.ranking:FeatureTable"``), ``meta`` (the object's JSON metadata),
  ``checksums`` (CRC-32 of every tensor's bytes, as JSON) and ``efffeat_version``.

An object is savable when its class is registered here and it implements the state protocol::

    def to_state(self) -> tuple[dict[str, Tensor], dict]: ...      # tensors, JSON-able metadata
    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict): ...

`EffectiveFeatures` is savable through a converter defined in this module. Writes go to a temporary file in
the target's directory, are flushed to disk and then renamed over the target (``os.replace``), so a crash
mid-write leaves the previous file intact (a stray ``.<name>.*.tmp`` file may remain; it is safe to delete).
JSON turns tuples into lists; everything else in ``meta`` round-trips as written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import ConfigError, SaveFileError
from .factors import DenseFactor, LowRankFactor
from .features import EffectiveFeatures
from .ids import FeatureIds, ParamSlot

FORMAT = "efffeat"
FORMAT_VERSION = 1

State = tuple[dict[str, Tensor], dict]

# Classes `load` may instantiate, by import path "module:Class" (imported only when a file needs them).
_REGISTERED: set[str] = {
    "efffeat.features:EffectiveFeatures",
    "efffeat.ranking:FeatureTable",
    "efffeat.search:TopK",
    "efffeat.kernels:Eigenfeatures",
    "efffeat.compare:ComparisonTable",
    "efffeat.zoo:Run",
}


def register(import_path: str) -> None:
    """Allow `save`/`load` for the class at ``"package.module:Class"`` (it must implement the state protocol)."""
    module, _, name = import_path.partition(":")
    if not module or not name:
        raise ConfigError(f"register takes an import path 'package.module:Class', got {import_path!r}")
    _REGISTERED.add(import_path)


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically (a single safetensors file); returns the path.

    Raises `ConfigError` if the object's class is not registered or its state is not tensors + JSON, and
    `SaveFileError` if the file cannot be written.
    """
    tag = _tag_of(obj)
    to_state, _ = _converters(tag, type(obj))
    tensors, meta = _checked_state(to_state(obj), type(obj).__name__)
    tensors = _own_storage({k: t.detach().cpu() for k, t in tensors.items()})
    from . import __version__

    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "type": tag,
        "meta": json.dumps(meta),
        "checksums": json.dumps({k: _crc(t) for k, t in tensors.items()}),
        "efffeat_version": __version__,
    }
    path = Path(path)
    if path.is_dir():
        raise SaveFileError(f"{path} is a directory; pass a file path such as {path / 'result.safetensors'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    except OSError as e:
        raise SaveFileError(f"could not write {path}: {e}; check the directory exists and is writable") from e
    return path


def load(path: str | os.PathLike) -> Any:
    """Read an object written by `save` (tensors on the CPU).

    Raises `SaveFileError` for a missing, corrupt, truncated or version-mismatched file.
    """
    path = Path(path)
    if not path.is_file():
        raise SaveFileError(f"{path} does not exist or is not a file; pass the path given to ef.save")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}  # own, aligned memory
    except Exception as e:  # safetensors raises its own error types for a damaged header or short file
        raise SaveFileError(f"{path} is corrupt or truncated ({e}); save the object again") from e
    tag, meta = _checked_header(header, path)
    sums = _json(header, "checksums", path)
    if set(sums) != set(tensors) or any(_crc(t) != sums[k] for k, t in tensors.items()):
        raise SaveFileError(f"{path} is corrupt: its tensor data does not match the checksums; save the object again")
    cls = _resolve(tag, path)
    _, from_state = _converters(tag, cls)
    try:
        return from_state(tensors, meta)
    except Exception as e:
        raise SaveFileError(f"{path} holds a {tag} whose state could not be restored ({type(e).__name__}: {e})") from e


# ---- the type registry ---------------------------------------------------------------------------------
def _import(import_path: str) -> type:
    module, _, name = import_path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _tag_of(obj: Any) -> str:
    cls = type(obj)
    own = f"{cls.__module__}:{cls.__qualname__}"
    if own in _REGISTERED:
        return own
    for tag in sorted(_REGISTERED):  # a class re-exported under a registered path
        with contextlib.suppress(Exception):  # a module that fails to import cannot hold the class
            if _import(tag) is cls:
                return tag
    raise ConfigError(
        f"cannot save a {cls.__name__}: its class is not registered for saving; give it to_state()/from_state() "
        f"and call efffeat.io.register({own!r})"
    )


def _resolve(tag: str, path: Path) -> type:
    if tag not in _REGISTERED:
        raise SaveFileError(
            f"{path} holds a {tag!r}, a type efffeat does not know; if it is your own class, call "
            f"efffeat.io.register({tag!r}) before loading"
        )
    try:
        return _import(tag)
    except (ImportError, AttributeError) as e:
        raise SaveFileError(f"{path} holds a {tag!r}, which this efffeat installation cannot import ({e})") from e


def _converters(tag: str, cls: type) -> tuple[Callable[[Any], State], Callable[[dict, dict], Any]]:
    if tag in _CONVERTERS:
        return _CONVERTERS[tag]
    if not (callable(getattr(cls, "to_state", None)) and callable(getattr(cls, "from_state", None))):
        raise ConfigError(f"{cls.__name__} does not implement to_state()/from_state(), so it cannot be saved")
    return (lambda obj: obj.to_state()), cls.from_state


# ---- checks ----------------------------------------------------------------------------------------------
def _checked_state(state: Any, what: str) -> State:
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict)):
        raise ConfigError(f"{what}.to_state() must return (tensors: dict[str, Tensor], meta: dict)")
    tensors, meta = state
    bad = [k for k, t in tensors.items() if not isinstance(k, str) or not isinstance(t, Tensor)]
    if bad:
        raise ConfigError(f"{what}.to_state() returned non-tensor entries {bad[:5]}; put them in meta")
    sparse = [k for k, t in tensors.items() if t.layout != torch.strided]
    if sparse:
        raise ConfigError(f"{what}.to_state() returned sparse tensors {sparse[:5]}; convert them with .to_dense()")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}.to_state() metadata is not JSON-serialisable ({e}); store tensors as tensors") from e
    return tensors, meta


def _checked_header(header: dict[str, str], path: Path) -> tuple[str, dict]:
    if header.get("format") != FORMAT:
        raise SaveFileError(f"{path} is a safetensors file but not an efffeat save file (no efffeat header)")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
        fix = "upgrade efffeat to read it" if newer else "re-create it with this efffeat version"
        raise SaveFileError(
            f"{path} was written in efffeat format version {version}, this efffeat reads version "
            f"{FORMAT_VERSION}; {fix}"
        )
    tag = header.get("type")
    if not tag:
        raise SaveFileError(f"{path} has no type tag; save the object again")
    return tag, _json(header, "meta", path)


def _json(header: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise SaveFileError(f"{path} has a damaged {key!r} header entry ({e}); save the object again") from e


# ---- bytes -------------------------------------------------------------------------------------------------
def _own_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors that each own their whole storage (safetensors refuses views and shared storage)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        storage = t.untyped_storage()
        exact = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not exact or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _crc(t: Tensor) -> int:
    """CRC-32 of a tensor's bytes in row-major order."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---- EffectiveFeatures -------------------------------------------------------------------------------------
def _features_to_state(feats: EffectiveFeatures) -> State:
    tensors: dict[str, Tensor] = {"z_init": feats.z_init, "z_trained": feats.z_trained}
    for name, f in feats.factors.items():
        if isinstance(f, LowRankFactor):
            tensors[f"factors/{name}/u"], tensors[f"factors/{name}/v"] = f.u, f.v
        else:
            tensors[f"factors/{name}/g"] = f.g
    for name, d in feats.delta.items():
        tensors[f"delta/{name}"] = d
    slots = [[s.name, s.state_name, list(s.shape), s.offset] for s in feats.slots]
    meta = {"order": feats.order, "scalar": feats.scalar, "slots": slots, "meta": feats.meta}
    return tensors, meta


def _features_from_state(tensors: dict[str, Tensor], meta: dict) -> EffectiveFeatures:
    slots = [ParamSlot(name, state_name, tuple(shape), offset) for name, state_name, shape, offset in meta["slots"]]
    factors = {}
    for s in slots:
        key = f"factors/{s.name}"
        if f"{key}/g" in tensors:
            factors[s.name] = DenseFactor(tensors[f"{key}/g"])
        else:
            factors[s.name] = LowRankFactor(tensors[f"{key}/u"], tensors[f"{key}/v"])
    delta = {s.name: tensors[f"delta/{s.name}"] for s in slots}
    return EffectiveFeatures(
        factors,
        FeatureIds(slots),
        delta,
        tensors["z_init"],
        tensors["z_trained"],
        meta["order"],
        meta["scalar"],
        meta["meta"],
    )


_CONVERTERS: dict[str, tuple[Callable[[Any], State], Callable[[dict, dict], Any]]] = {
    "efffeat.features:EffectiveFeatures": (_features_to_state, _features_from_state),
}
