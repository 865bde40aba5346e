"""Save files are loaded exactly as written or refused: every header bit, every JSON-valid edit of every header
entry, edits signed with a matching checksum, oversized run configs, a full disk, stale temporary files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_io import Box, _result_objects

import efffeat as ef
from efffeat import _atomic, io

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ENTRIES = (*io._HEADER, "checksum")
_OBJECTS: dict = {}


def objects() -> dict:
    """One instance of every savable result type (computed once)."""
    if not _OBJECTS:
        _OBJECTS.update(_result_objects())
    return _OBJECTS


def state_of(obj) -> tuple:
    """What makes two results the same: their type, tensors bit for bit and metadata as JSON."""
    tensors, meta = obj.to_state()
    raw = {
        k: (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).tolist()) for k, t in tensors.items()
    }
    return type(obj), raw, json.dumps(meta)


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def write(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor], sign: bool) -> None:
    """Write a file with `header`; `sign`: give it the checksum its entries have (a deliberate edit)."""
    header = dict(header)
    if sign:
        try:
            parsed = {k: json.loads(v) if k in ("meta", "tensors") else v for k, v in header.items()}
            header["checksum"] = io._checksum(parsed)
        except (KeyError, ValueError, RecursionError):
            pass
    save_file(tensors, str(path), metadata=header)


def loads_or_refuses(path: Path, original) -> object | None:
    """Load `path`: the object if it loads, None if it is refused with a SaveFileError (nothing else escapes)."""
    try:
        back = io.load(path)
    except ef.SaveFileError:
        return None
    assert type(back) is type(original)
    return back


# ---- every bit of the header -------------------------------------------------------------------------------
def test_every_header_bit_flip_is_refused_or_harmless(tmp_path):
    name = "EffectiveFeatures"
    obj = objects()[name]
    path = io.save(obj, tmp_path / "f.safetensors")
    raw = path.read_bytes()
    n_header = struct.unpack("<Q", raw[:8])[0]
    want = state_of(obj)
    silent, harmless, refused = [], 0, 0
    for bit in range((8 + n_header) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        back = loads_or_refuses(path, obj)
        if back is None:
            refused += 1
        elif state_of(back) == want:
            harmless += 1
        else:
            silent.append(bit)
    assert silent == [], f"{len(silent)} bit flips loaded a different {name}"
    assert refused > 0.99 * (8 + n_header) * 8


# ---- JSON-valid edits of every entry ------------------------------------------------------------------------
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3) | st.sampled_from([5, 2**40, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, 1e300]),
    st.text(max_size=4) | st.sampled_from(["nlo", "bogus-order", "0.weight", "float64", "efffeat", "tms"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=6,
)


def _nodes(value, path=()):
    """Paths of every node of a JSON value (root first)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*path, i))
    return out


def _tweaked(value, new):
    """A value of the same type next to `value` (a number moved, a string or list changed, a flag flipped)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + (new if isinstance(new, int) and not isinstance(new, bool) and new else 1)
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + (new if isinstance(new, str) else "_")
    if isinstance(value, list):
        return value[:-1] if value else [new]
    return new


def _edit(value, path, action, new):
    """`value` with the node at `path` tweaked, replaced, removed, duplicated, or given a new sibling key."""
    if not path:
        return _tweaked(value, new) if action == "tweak" else new if action == "replace" else value
    parent = value
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "tweak":
        parent[last] = _tweaked(parent[last], new)
    elif action == "replace":
        parent[last] = new
    elif action == "remove":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, json.loads(json.dumps(parent[last])))
    elif isinstance(parent, dict):
        parent[f"{last}_"] = new
    return value


# The names of `test_io._result_objects`, one instance of every savable type.
NAMES = (
    "EffectiveFeatures",
    "NeuronActivations",
    "Spectrum(kernel matrix)",
    "Spectrum(P×P Gram)",
    "Tracking",
    "FeatureTable(param)",
    "FeatureTable(neuron)",
    "TopK",
    "Spectrum",
    "KernelChange",
    "ComparisonTable",
    "Run",
)
_EDITS = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(["tweak", "tweak", "replace", "remove", "duplicate", "sibling"]),
    _VALUES,
    st.randoms(use_true_random=False),
)


def _apply(header: dict[str, str], entry: str, action: str, new, rnd) -> dict[str, str]:
    """`header` with one JSON-valid edit of `entry`: a node of its JSON (or the entry itself) replaced by `new`,
    removed, duplicated or given a new sibling."""
    header = dict(header)
    if entry in ("meta", "tensors"):
        value = json.loads(header[entry])
        path = rnd.choice(_nodes(value))
        header[entry] = json.dumps(_edit(value, path, action, new), separators=(",", ":"))
    elif action == "remove":
        del header[entry]
    elif action == "tweak":
        header[entry] = _tweaked(header[entry], new)
    else:
        header[entry] = new if isinstance(new, str) else json.dumps(new)
    return header


def _exercise(obj) -> None:
    """Use a loaded object the way a user would (any efffeat error is fine, nothing else is)."""
    calls = {
        ef.EffectiveFeatures: lambda f: (
            f.kernel(),
            f.completeness(),
            list(f.ids),
            f.columns([0]),
            ef.rank(f),
            repr(f),
        ),
        ef.FeatureTable: lambda t: (t.to_records(), t.render(), list(t.ids)),
        ef.zoo.Run: lambda r: (r.evaluate(), r.train(1, progress=False), repr(r)),
    }
    call = calls.get(type(obj), repr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(obj)
    except ef.EfffeatError:
        pass


def _check_edit(entry, signed, edit, tmp_path) -> None:
    name, action, new, rnd = edit
    assert set(NAMES) == set(objects())
    obj = objects()[name]
    path = tmp_path / f"{name}.safetensors"
    io.save(obj, path)
    header, tensors = read(path)
    write(path, _apply(header, entry, action, new, rnd), tensors, sign=signed)
    back = loads_or_refuses(path, obj)
    if back is None or state_of(back) == state_of(obj):
        event("refused" if back is None else "the original")
        return
    event("another valid object")
    assert signed, f"an edit of {entry!r} loaded a different {name} without a checksum that matches it"
    # a deliberate, re-signed edit may describe another valid object: it must be one, and save as itself
    again = io.load(io.save(back, tmp_path / "again.safetensors"))
    assert state_of(again) == state_of(back)
    _exercise(back)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("signed", [False, True], ids=["as-edited", "re-signed"])
@FUZZ
@given(edit=_EDITS)
def test_fuzzed_header_edits_load_the_original_or_are_refused(entry, signed, edit, tmp_path):
    _check_edit(entry, signed, edit, tmp_path)


@settings(FUZZ, max_examples=400)
@given(edit=_EDITS)
def test_fuzzed_signed_metadata_builds_only_valid_objects(edit, tmp_path):
    _check_edit("meta", True, edit, tmp_path)


# ---- the edits the schema must refuse even when they are signed ---------------------------------------------
def _signed_edit(tmp_path, name, change):
    obj = objects()[name]
    path = io.save(obj, tmp_path / f"{name}.safetensors")
    header, tensors = read(path)
    meta = json.loads(header["meta"])
    change(meta)
    header["meta"] = json.dumps(meta)
    write(path, header, tensors, sign=True)
    return path


def _set(key, value):
    def change(meta):
        node = meta
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = value

    return change


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("EffectiveFeatures", _set(("order",), "bogus-order"), "meta.order must be one of"),
        ("EffectiveFeatures", _set(("slots", 0, 3), 5), r"offset must be 0"),
        ("EffectiveFeatures", _set(("slots", 1, 3), 0), r"offset must be \d+"),
        ("EffectiveFeatures", _set(("slots", 0, 2), [4, 6]), r"delta/0.weight"),
        ("EffectiveFeatures", _set(("slots", 1, 1), "0.weight"), "not used by another slot"),
        ("EffectiveFeatures", _set(("scalar",), True), "scalar must be false"),
        ("EffectiveFeatures", _set(("scalar",), 1), "true or false"),
        ("FeatureTable(neuron)", lambda meta: meta["ids"].__setitem__(1, meta["ids"][0]), "no duplicates"),
        ("FeatureTable(neuron)", _set(("group",), "bogus"), "meta.group"),
        ("TopK", _set(("meta", "n_examples"), 1), r"outside \[0, 1\)"),
        ("Spectrum", _set(("params",), ["0.weight", "nope"]), "meta.params"),
        ("Tracking", _set(("extra",), 1), "wrong fields"),
        ("ComparisonTable", _set(("rows", 0, "method"), 3), "method"),
        ("Run", _set(("config", "n_features"), 5), "do not match what the run's config builds"),
        ("Run", _set(("config", "lr"), "fast"), "lr must be"),
        ("Run", _set(("config", "kind"), "os"), "unknown zoo model kind"),
    ],
)
def test_signed_edits_that_make_no_sense_are_refused(tmp_path, name, change, match):
    path = _signed_edit(tmp_path, name, change)
    with pytest.raises(ef.SaveFileError, match=match):
        io.load(path)


def test_a_damaged_header_entry_is_a_save_file_error(tmp_path):
    obj = objects()["EffectiveFeatures"]
    path = io.save(obj, tmp_path / "f.safetensors")
    header, tensors = read(path)
    for entry, text in [
        ("tensors", "123"),
        ("tensors", "null"),
        ("meta", "[" * 100_000 + "]" * 100_000),
        ("meta", '{"order": "nlo", "order": "init"}'),
        ("meta", "not json"),
    ]:
        for sign in (False, True):
            write(path, {**header, entry: text}, tensors, sign=sign)
            with pytest.raises(ef.SaveFileError):
                io.load(path)


# ---- an oversized run config --------------------------------------------------------------------------------
_HUGE = """
import resource, sys, time
from efffeat import io
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    io.load(sys.argv[1])
except io.SaveFileError as e:
    print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, e, sep="\\n")
"""


@pytest.mark.parametrize("signed", [False, True])
def test_an_oversized_run_config_is_refused_at_once(tmp_path, signed):
    run = ef.zoo.tms(n_data=16, batch_size=8)
    path = io.save(run, tmp_path / "run.safetensors")
    header, tensors = read(path)
    meta = json.loads(header["meta"])
    meta["config"].update(n_features=30_000, n_hidden=30_000, n_data=30_000)
    write(path, {**header, "meta": json.dumps(meta)}, tensors, sign=signed)
    out = subprocess.run([sys.executable, "-c", _HUGE, str(path)], capture_output=True, text=True, timeout=120)
    seconds, grown_kib, message = out.stdout.strip().split("\n")
    assert float(seconds) < 1.0 and int(grown_kib) < 100 * 1024, (seconds, grown_kib)
    assert ("more than the" in message) if signed else ("checksum" in message)


# ---- a full disk ------------------------------------------------------------------------------------------
_FULL = """
import resource, signal, sys, torch
from efffeat import io
from test_io import Box
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    io.save(Box({"x": torch.zeros(1 << 16)}, {}), sys.argv[1])
except io.SaveFileError as e:
    print("SaveFileError:", e)
"""


def test_a_full_disk_is_a_save_file_error_and_leaves_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    target = tmp_path / "big.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FULL), str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("SaveFileError: could not write"), out.stdout + out.stderr
    assert "disk has space" in out.stdout
    assert list(tmp_path.iterdir()) == []


# ---- stale temporary files -----------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_save_removes_temporary_files_of_dead_writers_only(tmp_path):
    host, dead, alive = _atomic._host(), _dead_pid(), os.getpid()
    files = {
        "dead": f".result.safetensors.{host}.{dead}.abc123{_atomic.TMP_SUFFIX}",
        "dead_other_target": f".kernel.npy.{host}.{dead}.x_y{_atomic.TMP_SUFFIX}",
        "alive": f".result.safetensors.{host}.{alive}.def456{_atomic.TMP_SUFFIX}",
        "other_host": f".result.safetensors.elsewhere.{dead}.ghi789{_atomic.TMP_SUFFIX}",
        "not_ours": f"notes.{host}.{dead}.txt",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / files["dead"]).write_bytes(b"partial")  # another directory: not touched
    io.save(Box({"x": torch.ones(2)}, {}), tmp_path / "result.safetensors")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"result.safetensors", "sub", files["alive"], files["other_host"], files["not_ours"]}
    assert (tmp_path / "sub" / files["dead"]).exists()
