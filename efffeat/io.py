"""Saving and loading efffeat results: one safetensors file per object, written atomically, checked on load.

File layout (a standard ``.safetensors`` file, readable by any safetensors reader):

- the tensors of the object's state, stored bit-exactly (dtype, shape, values);
- ``__metadata__``: ``format = "efffeat"``, ``format_version``, ``type`` (the registered import path of the
  object's class, e.g. ``"efffeat.ranking:FeatureTable"``), ``meta`` (the object's JSON metadata),
  ``checksums`` (CRC-32 of every tensor's bytes, as JSON) and ``efffeat_version``.

An object is savable when its class is registered (`register`, which efffeat's own result classes do where
they are defined) and implements the state protocol::

    def to_state(self) -> tuple[dict[str, Tensor], dict]: ...      # tensors, JSON-able metadata
    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict): ...

Writes are atomic (`efffeat._atomic`): a crash mid-write leaves the previous file intact. JSON turns tuples
into lists; everything else in ``meta`` round-trips as written.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._atomic import write_atomic
from ._savable import class_for, register, tag_for, tag_of
from ._version import __version__
from .errors import ConfigError, SaveFileError

FORMAT = "efffeat"
FORMAT_VERSION = 1

State = tuple[dict[str, Tensor], dict]

__all__ = ["load", "register", "save"]


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically (a single safetensors file); returns the path.

    Raises `ConfigError` if the object's class is not registered or its state is not tensors + JSON, and
    `SaveFileError` if the file cannot be written.
    """
    tag = tag_for(obj)
    if tag is None:
        own = tag_of(type(obj))
        raise ConfigError(
            f"cannot save a {type(obj).__name__}: its class is not registered for saving; give it "
            f"to_state()/from_state() and call efffeat.io.register({own!r}) (or decorate the class with it)"
        )
    tensors, meta = _checked_state(obj.to_state(), type(obj).__name__)
    tensors = _own_storage({k: t.detach().cpu() for k, t in tensors.items()})
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
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))
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
    cls = class_for(tag)
    if cls is None:
        raise SaveFileError(
            f"{path} holds a {tag!r}, a type efffeat does not know; if it is your own class, "
            f"call efffeat.io.register({tag!r}) before loading"
        )
    try:
        return cls.from_state(tensors, meta)
    except Exception as e:
        raise SaveFileError(f"{path} holds a {tag} whose state could not be restored ({type(e).__name__}: {e})") from e


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
