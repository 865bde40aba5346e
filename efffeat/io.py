"""Saving and loading efffeat results: one safetensors file per object, written atomically, checked on load.

File layout (a standard ``.safetensors`` file, readable by any safetensors reader):

- the tensors of the object's state, stored bit-exactly (dtype, shape, values);
- ``__metadata__``: ``format = "efffeat"``, ``format_version``, ``type`` (the registered import path of the
  object's class, e.g. ``"efffeat.ranking:FeatureTable"``), ``meta`` (the object's JSON metadata),
  ``tensors`` (every tensor's dtype, shape and CRC-32 of its bytes, as JSON), ``efffeat_version`` and
  ``checksum``: the SHA-256 of all of these in canonical JSON, so that no entry can change unnoticed.

`load` reads nothing it has not checked: the header's entries and the checksum, then each tensor against
its dtype, shape and CRC, then the object's state against what its class declares it must look like
(``validate_state``), and only then builds the object. Every failure is a `SaveFileError`.

An object is savable when its class is registered (`register`, which efffeat's own result classes do where
they are defined) and implements the state protocol::

    def to_state(self) -> tuple[dict[str, Tensor], dict]: ...      # tensors, JSON-able metadata
    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict): ...
    @classmethod
    def validate_state(cls, tensors: dict[str, Tensor], meta: dict) -> None: ...   # optional

``validate_state`` raises `SaveFileError` for a state `from_state` must not build (types, choices, ranges,
shapes that disagree); the checks below (`record`, `text`, `whole`, `tensor`, ...) name the field that is
wrong. Writes are atomic (`efffeat._atomic`): a crash mid-write leaves the previous file intact, and a full
disk leaves no partial file. JSON turns tuples into lists; everything else in ``meta`` round-trips as written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._atomic import write_atomic
from ._savable import class_for, register, tag_for, tag_of
from ._version import __version__
from .errors import ConfigError, SaveFileError
from .ids import ParamSlot

FORMAT = "efffeat"
FORMAT_VERSION = 2

# Deepest nesting of lists and objects a header's JSON may have.
MAX_DEPTH = 64

State = tuple[dict[str, Tensor], dict]
Check = Callable[[Any, str], Any]  # (value, where it is) -> the value, or raise SaveFileError

_HEADER = ("format", "format_version", "type", "meta", "tensors", "efffeat_version")

__all__ = [
    "Check",
    "anything",
    "dict_of",
    "flag",
    "invalid",
    "list_of",
    "load",
    "nullable",
    "number",
    "record",
    "register",
    "save",
    "slots",
    "tensor",
    "tensor_names",
    "text",
    "whole",
]


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically (a single safetensors file); returns the path.

    Raises `ConfigError` if the object's class is not registered or its state is not tensors + JSON, and
    `SaveFileError` if the file cannot be written (no directory, no permission, a full disk).
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
    entries = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "type": tag,
        "meta": meta,
        "tensors": {k: _describe(t) for k, t in tensors.items()},
        "efffeat_version": __version__,
    }
    header = {k: v if isinstance(v, str) else _canonical(v) for k, v in entries.items()}
    header["checksum"] = _checksum(entries)
    path = Path(path)
    if path.is_dir():
        raise SaveFileError(f"{path} is a directory; pass a file path such as {path / 'result.safetensors'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write (e.g. a full disk) as its own
        raise SaveFileError(
            f"could not write {path} ({_one_line(e)}); check that its directory is writable and the disk has space"
        ) from e
    return path


def load(path: str | os.PathLike) -> Any:
    """Read an object written by `save` (tensors on the CPU).

    Raises `SaveFileError` for a missing, corrupt, truncated, edited or version-mismatched file.
    """
    path = Path(path)
    if not path.is_file():
        raise SaveFileError(f"{path} does not exist or is not a file; pass the path given to ef.save")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}  # noqa: SIM118  (own, aligned memory)
    except Exception as e:  # safetensors raises its own error types for a damaged header or short file
        raise SaveFileError(f"{path} is corrupt or truncated ({_one_line(e)}); save the object again") from e
    tag, meta = _checked_header(header, tensors, path)
    cls = class_for(tag)
    if cls is None:
        raise SaveFileError(
            f"{path} holds a {tag!r}, a type efffeat does not know; if it is your own class, "
            f"call efffeat.io.register({tag!r}) before loading"
        )
    try:
        validate = getattr(cls, "validate_state", None)
        if validate is not None:
            validate(tensors, meta)
        return cls.from_state(tensors, meta)
    except SaveFileError as e:
        raise SaveFileError(
            f"{path} holds a {tag} whose state is invalid: {_one_line(e)}; the file was damaged or edited, "
            "save the object again"
        ) from e
    except Exception as e:
        raise SaveFileError(
            f"{path} holds a {tag} whose state could not be restored ({type(e).__name__}: {_one_line(e)})"
        ) from e


# ---- the header -------------------------------------------------------------------------------------------
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
    if _depth(meta) > MAX_DEPTH:
        raise ConfigError(f"{what}.to_state() metadata is nested deeper than {MAX_DEPTH} levels; flatten it")
    return tensors, meta


def _checked_header(header: dict[str, str], tensors: dict[str, Tensor], path: Path) -> tuple[str, Any]:
    """The type tag and metadata of a file whose header and tensors pass every check."""
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
    if set(header) != {*_HEADER, "checksum"}:
        odd = sorted(set(header) ^ {*_HEADER, "checksum"})
        raise SaveFileError(f"{path} has a damaged header (entries {odd} missing or unexpected); save the object again")
    entries = {
        k: header[k] if k in ("format", "format_version", "type", "efffeat_version") else _json(header, k, path)
        for k in _HEADER
    }
    if header["checksum"] != _checksum(entries):
        raise SaveFileError(f"{path} is corrupt: its metadata does not match its checksum; save the object again")
    described = entries["tensors"]
    if not isinstance(described, dict) or set(described) != set(tensors):
        raise SaveFileError(f"{path} is corrupt: its tensors are not the ones its header lists; save the object again")
    if any(_describe(t) != described[k] for k, t in tensors.items()):
        raise SaveFileError(f"{path} is corrupt: its tensor data does not match the checksums; save the object again")
    return entries["type"], entries["meta"]


def _json(header: dict[str, str], key: str, path: Path) -> Any:
    """A header entry's JSON, refused when damaged, nested too deep or holding a key twice."""
    try:
        value = json.loads(header[key], object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise SaveFileError(f"{path} has a damaged {key!r} header entry ({_one_line(e)}); save the object again") from e
    if _depth(value) > MAX_DEPTH:
        raise SaveFileError(f"{path} has a {key!r} header entry nested deeper than {MAX_DEPTH} levels; it is damaged")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return out


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else None
        if children is not None:
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((c, d + 1) for c in children)
    return deepest


def _canonical(value: Any) -> str:
    """One spelling of a JSON value: no spaces, ASCII, key order kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _checksum(entries: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical([entries[k] for k in _HEADER]).encode()).hexdigest()


def _describe(t: Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "crc32"}`` of a tensor as its file header lists it."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "crc32": _crc(t)}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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


# ---- checking a state before it is built (the vocabulary of ``validate_state``) ----------------------------
def invalid(where: str, expected: str, value: Any) -> NoReturn:
    """Raise `SaveFileError`: the field at `where` is not `expected`."""
    shown = repr(value)
    raise SaveFileError(f"{where} must be {expected}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def anything(value: Any, where: str) -> Any:
    """Any JSON value."""
    return value


def flag(value: Any, where: str) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        invalid(where, "true or false", value)
    return value


def text(choices: tuple[str, ...] | None = None, empty: bool = False) -> Check:
    """A string (one of `choices` when given; non-empty unless `empty`)."""

    def check(value: Any, where: str) -> str:
        if choices is not None and value not in choices:
            invalid(where, f"one of {', '.join(repr(c) for c in choices)}", value)
        if not isinstance(value, str) or not (empty or value):
            invalid(where, "a string" if empty else "a non-empty string", value)
        return value

    return check


def whole(minimum: int = 0, maximum: int | None = None) -> Check:
    """An integer in ``[minimum, maximum]`` (``true``/``false`` are not integers)."""

    def check(value: Any, where: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if not ok or (maximum is not None and value > maximum):
            invalid(where, f"an integer ≥ {minimum}" + (f" and ≤ {maximum}" if maximum is not None else ""), value)
        return value

    return check


def number(minimum: float | None = None, finite: bool = True) -> Check:
    """A real number (an integer counts; finite unless `finite` is False; ≥ `minimum` when given)."""

    def check(value: Any, where: str) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (math.isfinite(value) or not finite) and (minimum is None or value >= minimum)
        if not ok:
            bound = f" ≥ {minimum:g}" if minimum is not None else ""
            invalid(where, ("a finite number" if finite else "a number") + bound, value)
        return value

    return check


def nullable(check: Check) -> Check:
    """``null`` or what `check` accepts."""
    return lambda value, where: None if value is None else check(value, where)


def list_of(check: Check = anything, unique: bool = False) -> Check:
    """A list whose items `check` accepts (pairwise different when `unique`)."""

    def run(value: Any, where: str) -> list:
        if not isinstance(value, list):
            invalid(where, "a list", value)
        out = [check(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if unique:
            seen = set()
            for i, v in enumerate(out):
                key = _canonical(v)
                if key in seen:
                    invalid(f"{where}[{i}]", "different from the items before it (no duplicates)", v)
                seen.add(key)
        return out

    return run


def dict_of(check: Check = anything) -> Check:
    """An object whose values `check` accepts."""

    def run(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            invalid(where, "an object", value)
        return {k: check(v, f"{where}.{k}") for k, v in value.items()}

    return run


def record(
    value: Any,
    where: str,
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
    others: Check | None = None,
) -> dict[str, Any]:
    """An object with the `required` keys and any of the `optional` ones, each value checked; other keys are
    refused, or checked by `others` when it is given."""
    known = {**(optional or {}), **required}
    if not isinstance(value, dict):
        invalid(where, "an object", value)
    missing = [k for k in required if k not in value]
    unknown = [k for k in value if k not in known] if others is None else []
    if missing or unknown:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unknown}"] if unknown else [])
        raise SaveFileError(f"{where} has the wrong fields ({'; '.join(parts)})")
    return {k: known.get(k, others)(v, f"{where}.{k}") for k, v in value.items()}  # type: ignore[misc]


def slots(value: Any, where: str) -> list[ParamSlot]:
    """Parameter slots ``[[name, state_name, shape, offset], ...]``: unique names, offsets back to back."""
    if not isinstance(value, list):
        invalid(where, "a list of parameter slots", value)
    out: list[ParamSlot] = []
    offset, names = 0, set()
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not (isinstance(item, list) and len(item) == 4):
            invalid(at, "[name, state_name, shape, offset]", item)
        name, state_name = text()(item[0], f"{at}.name"), text()(item[1], f"{at}.state_name")
        shape = tuple(list_of(whole())(item[2], f"{at}.shape"))
        if whole()(item[3], f"{at}.offset") != offset:
            invalid(f"{at}.offset", f"{offset} (the end of the slot before it)", item[3])
        for n in {name, state_name}:
            if n in names:
                invalid(f"{at}.name", "a parameter name not used by another slot", n)
            names.add(n)
        out.append(ParamSlot(name, state_name, shape, offset))
        offset += out[-1].numel
    return out


_KINDS: dict[str, Callable[[torch.dtype], bool]] = {
    "float": lambda d: d.is_floating_point,
    "int": lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool,
    "any": lambda d: True,
}


def tensor(
    tensors: Mapping[str, Tensor],
    name: str,
    kind: str = "any",
    shape: tuple[int | None, ...] | None = None,
    ndim: int | tuple[int, ...] | None = None,
) -> Tensor:
    """The tensor `name` of a state, checked: `kind` ``"float" | "int" | "any"``, `shape` (None entries match
    any size) or `ndim` (one or several allowed)."""
    if name not in tensors:
        raise SaveFileError(f"the tensor {name!r} is missing")
    t = tensors[name]
    if not _KINDS[kind](t.dtype):
        invalid(f"tensor {name!r}", f"of a {kind} dtype", t.dtype)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.ndim not in dims:
        invalid(f"tensor {name!r}", f"{' or '.join(map(str, dims))}-dimensional", tuple(t.shape))
    if shape is not None and (t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        invalid(f"tensor {name!r}", f"of shape {tuple('*' if s is None else s for s in shape)}", tuple(t.shape))
    return t


def tensor_names(tensors: Mapping[str, Tensor], expected: set[str] | Callable[[str], bool]) -> None:
    """The state holds exactly the tensors `expected` (a set of names, or a predicate every name passes)."""
    if callable(expected):
        odd = sorted(k for k in tensors if not expected(k))
    else:
        odd = sorted(set(tensors) ^ expected)
    if odd:
        raise SaveFileError(f"the tensors {odd[:5]} are missing or unexpected")
