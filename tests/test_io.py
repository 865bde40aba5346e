"""ef.io: bit-exact round trips of every savable type, atomic writes that survive a killed writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _models import mlp, perturbed

import efffeat as ef
from efffeat import io
from efffeat._atomic import TMP_SUFFIX


class Box:
    """A minimal savable result: any tensors plus JSON metadata."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.tensors, self.meta = tensors, meta

    def to_state(self):
        return self.tensors, self.meta

    @classmethod
    def from_state(cls, tensors, meta):
        return cls(tensors, meta)


io.register(f"{__name__}:Box")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def awkward_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-310, 3.0])
    return {
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::2],
        "rows_a": base[:3],  # two views of one storage
        "rows_b": base[3:],
        "expanded": torch.randn(1, 4, generator=g).expand(3, 4),  # stride 0
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 7),
        "empty_int": torch.empty(3, 0, dtype=torch.int32),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "special": special,
        "int64": torch.randint(-(2**62), 2**62, (5,), generator=g),
        "uint8": torch.randint(0, 255, (2, 2), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "name/with.dots[0]": torch.ones(1),
    }


def test_round_trip_is_bit_exact(tmp_path):
    tensors = awkward_tensors()
    meta = {"name": "τ-unicode", "nested": {"k": [1, 2.5, None, True]}, "big": 2**60, "float": 0.1}
    path = io.save(Box(tensors, meta), tmp_path / "box.safetensors")
    back = io.load(path)
    assert isinstance(back, Box)
    assert set(back.tensors) == set(tensors)
    for k, t in tensors.items():
        assert_identical(back.tensors[k], t)
    assert back.meta == meta


def features(order: str, readout="output"):
    torch.manual_seed(0)
    model = mlp(4, (6, 5), 3).double()
    init = perturbed(model, 0.3)
    x = torch.randn(9, 4, dtype=torch.float64)
    return ef.DualModel(model, init, readout=readout, order=order, progress=False).features(x, batch_size=4)


@pytest.mark.parametrize(("order", "readout"), [("nlo", "output"), ("path", 1), ("init", "output")])
def test_effective_features_round_trip(tmp_path, order, readout):
    feats = features(order, readout)
    back = io.load(io.save(feats, tmp_path / "feats.safetensors"))
    assert isinstance(back, ef.EffectiveFeatures)
    assert (back.order, back.scalar, back.meta) == (feats.order, feats.scalar, feats.meta)
    assert back.slots == feats.slots and list(back.ids) == list(feats.ids)
    assert back.factors.keys() == feats.factors.keys()
    for name, f in feats.factors.items():
        g = back.factors[name]
        assert type(g) is type(f)
        for attr in ("u", "v") if isinstance(f, ef.LowRankFactor) else ("g",):
            assert_identical(getattr(g, attr), getattr(f, attr))
    for name in feats.delta:
        assert_identical(back.delta[name], feats.delta[name])
    assert_identical(back.z_init, feats.z_init)
    assert_identical(back.z_trained, feats.z_trained)
    assert_identical(back.kernel(), feats.kernel())


def _result_objects():
    from efffeat.baselines.compare import ComparisonTable
    from efffeat.ranking import rank
    from efffeat.search import max_activating
    from efffeat.spectra import eigenfeatures
    from efffeat.zoo import tms

    torch.manual_seed(0)
    model = mlp(4, (6,), 3).double()
    dual = ef.DualModel(model, perturbed(model, 0.3), order="nlo", progress=False)
    x = torch.randn(9, 4, dtype=torch.float64)
    feats = dual.features(x)
    run = tms(n_features=4, n_hidden=2, n_data=16, batch_size=8, seed=0).train(steps=3, progress=False)
    from efffeat.baselines import neurons
    from efffeat.spectra import eigenmodes, flattened_modes, track

    return {
        "EffectiveFeatures": feats,
        "NeuronActivations": neurons(model, x, "1"),
        "Spectrum(kernel matrix)": eigenmodes(feats.kernel(reduce="pairs"), k=4),
        "Spectrum(P×P Gram)": flattened_modes(feats, 3),
        "KernelChange": ef.kernel_change(dual, x, order="path", k=3),
        "Tracking": track([(0, 1.0), (5, 2.0), (9, 2.5)], analyse=float, progress=False),
        "FeatureTable(param)": rank(feats, by="contribution"),
        "FeatureTable(neuron)": rank(feats, by="variance", group="neuron", top=4),
        "TopK": max_activating(dual, x, ["0.weight[1,:]", "2.weight[0,3]"], k=3, progress=False),
        "Spectrum": eigenfeatures(feats, k=3),
        "ComparisonTable": ComparisonTable([{"method": "pca", "mmcs": 0.1 + 0.2, "n": 3}], {"kind": "tms"}),
        "Run": run,
    }


def test_every_result_type_round_trips_through_a_file(tmp_path):
    for name, obj in _result_objects().items():
        back = io.load(io.save(obj, tmp_path / f"{name}.safetensors"))
        assert type(back) is type(obj), name
        (tensors, meta), (tensors_back, meta_back) = obj.to_state(), back.to_state()
        assert meta_back == json.loads(json.dumps(meta)), name
        assert tensors_back.keys() == tensors.keys(), name
        for key, t in tensors.items():
            assert_identical(tensors_back[key], t)


def test_every_efffeat_savable_class_validates_its_state():
    for name, obj in _result_objects().items():
        assert callable(getattr(type(obj), "validate_state", None)), name
        tensors, meta = obj.to_state()
        type(obj).validate_state(tensors, json.loads(json.dumps(meta)))  # what a file holds passes


def test_every_savable_class_is_covered_above():
    import efffeat.baselines.compare  # noqa: F401  (registers its classes)
    import efffeat.zoo  # noqa: F401
    from efffeat._savable import _CLASSES

    assert set(_CLASSES.values()) <= {type(obj) for obj in _result_objects().values()} | {Box}


def test_saving_rows_of_features_saves_only_those_rows(tmp_path):
    feats = features("nlo").select_rows(slice(2, 5))  # views into larger storages
    back = io.load(io.save(feats, tmp_path / "rows.safetensors"))
    assert back.n_examples == 3
    assert_identical(back.kernel(), feats.kernel())
    assert os.path.getsize(tmp_path / "rows.safetensors") < 20_000


def test_overwrite_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "box.safetensors"
    io.save(Box({"x": torch.zeros(3)}, {"v": 1}), path)
    io.save(Box({"x": torch.ones(4)}, {"v": 2}), path)
    back = io.load(path)
    assert back.meta == {"v": 2} and torch.equal(back.tensors["x"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.safetensors"]


def test_save_creates_missing_directories(tmp_path):
    path = io.save(Box({}, {}), tmp_path / "a" / "b" / "empty.safetensors")
    assert io.load(path).tensors == {}


_WRITER = """
import sys, torch
from efffeat import io
from test_io import Box
io.save(Box({"big": torch.full((48, 1 << 20), 7.0)}, {"v": "new"}), sys.argv[1])
"""


def test_killed_writer_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "result.safetensors"
    io.save(Box({"x": torch.arange(5.0)}, {"v": "old"}), path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), str(path)], env=env)
    seen_tmp = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
            if tmp and tmp[0].stat().st_size > 0:
                seen_tmp = True
                break
            time.sleep(0.0005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen_tmp, "the writer finished before it could be killed mid-write"
    back = io.load(path)
    assert back.meta == {"v": "old"} and torch.equal(back.tensors["x"], torch.arange(5.0))
    io.save(Box({"x": torch.ones(2)}, {"v": "after"}), path)  # a later save works, and removes the killed one's file
    assert io.load(path).meta == {"v": "after"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.safetensors"]


class Unregistered(Box):
    pass


class NoProtocol:
    pass


def test_saving_unsavable_objects_is_refused(tmp_path):
    with pytest.raises(ef.ConfigError, match="register"):
        io.save(Unregistered({}, {}), tmp_path / "x.safetensors")
    with pytest.raises(ef.ConfigError, match="register"):
        io.save(NoProtocol(), tmp_path / "x.safetensors")
    with pytest.raises(ef.ConfigError, match="JSON"):
        io.save(Box({}, {"t": torch.zeros(1)}), tmp_path / "x.safetensors")
    with pytest.raises(ef.ConfigError, match="non-tensor"):
        io.save(Box({"x": [1, 2]}, {}), tmp_path / "x.safetensors")
    with pytest.raises(ef.ConfigError, match="import path"):
        io.register("no_colon")
    with pytest.raises(ef.SaveFileError, match="directory"):
        io.save(Box({}, {}), tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
