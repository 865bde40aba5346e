"""Bad input gets a named efffeat error whose message says what is wrong and what to do; fuzzing finds no other.

One test per row of the bad-input list: model/data mismatch, NaN/inf, init state, readout, unsupported
parameters, memory, feature ids, empty data, train-mode randomness, damaged save files.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from _models import mlp, perturbed
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import efffeat as ef
import efffeat._memory
from efffeat import io

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def small(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = mlp(3, (4,), 2)
    return model, perturbed(model, 0.1, seed)


def dual_of(readout="output", order="nlo", **kw) -> ef.DualModel:
    model, init = small()
    return ef.DualModel(model, init, readout=readout, order=order, progress=False, **kw)


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))


# ---- model and data disagree -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.randn(6, 5), r"shape \(6, 5\)"),  # wrong width
        (torch.randint(0, 3, (6, 3)), "torch.int64"),  # integer inputs to a float model
        (torch.ones(6, 3, dtype=torch.bool), "torch.bool"),
        (torch.randn(6, 3, dtype=torch.complex64), "complex64"),
        (torch.randn(3), r"one example per row"),  # a single example without its batch axis
        ([torch.randn(2, 3), torch.randn(2, 4)], r"shape \(2, 4\)"),  # a later batch disagrees
    ],
)
def test_data_the_model_rejects(data, match):
    with pytest.raises(ef.DataError, match=match):
        dual_of().features(data)


def test_a_float64_batch_is_cast_to_the_model_dtype():
    feats = dual_of().features(X.double())
    assert feats.dtype == torch.float32


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("text", "cannot read data of type str"),
        ({"x": X}, "unexpected keyword argument 'x'"),  # a dict is passed as keyword arguments: model(**batch)
        (None, "cannot read data of type NoneType"),
        ((X, torch.zeros(5)), "different lengths"),
        ([[1.0, 2.0]], "first element is the input tensor"),
    ],
)
def test_data_of_the_wrong_kind(data, match):
    with pytest.raises(ef.DataError, match=match):
        dual_of().features(data)


# ---- NaN and inf, and where -----------------------------------------------------------------------------------
def test_nonfinite_trained_parameter_is_named():
    model, init = small()
    with torch.no_grad():
        model[2].weight[1, 0] = float("inf")
    with pytest.raises(ef.NonFiniteError, match=r"trained parameter '2.weight' holds 1 NaN/inf"):
        ef.DualModel(model, init)


def test_nonfinite_init_entry_is_named():
    model, init = small()
    init["0.bias"] = init["0.bias"].clone()
    init["0.bias"][2] = float("nan")
    with pytest.raises(ef.NonFiniteError, match=r"init state entry '0.bias' holds 1 NaN/inf"):
        ef.DualModel(model, init)


def test_nonfinite_input_names_the_example_across_batches():
    x = X.clone()
    x[5, 1] = float("-inf")
    with pytest.raises(ef.NonFiniteError, match="input example 5 contains NaN or inf"):
        dual_of().features(x, batch_size=2)


def test_nonfinite_readout_of_finite_inputs():
    with pytest.raises(ef.NonFiniteError, match="readout at trained"):
        dual_of(readout=lambda out, batch: out.log()).features(X)  # log of negative outputs


# ---- the init state -----------------------------------------------------------------------------------------
def init_variants():
    model, init = small()
    missing = {k: v for k, v in init.items() if k != "2.weight"}
    extra = {**init, "3.weight": torch.zeros(2, 2)}
    wrong_shape = {**init, "0.weight": torch.zeros(3, 4)}
    not_tensor = {**init, "0.bias": [0.0] * 4}
    return [
        (missing, r"no entry for 2.weight"),
        (extra, r"keys the model does not have: '3.weight'"),
        (wrong_shape, r"'0.weight' has shape \(3, 4\) but the model's parameter has \(4, 3\)"),
        (not_tensor, r"'0.bias' has shape list"),
        ([1, 2], r"a mapping"),
    ]


@pytest.mark.parametrize(("init", "match"), init_variants())
def test_init_state_that_does_not_match(init, match):
    model, _ = small()
    with pytest.raises(ef.InitStateError, match=match):
        ef.DualModel(model, init)


# ---- the readout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("readout", "match"),
    [
        (lambda out, batch: out.sum(), r"shape \(\) for a batch of 6"),
        (lambda out, batch: out[:, :, None], r"shape \(6, 2, 1\)"),
        (lambda out, batch: out[:3], r"shape \(3, 2\) for a batch of 6"),
        (lambda out, batch: out.detach(), "does not depend differentiably"),
        (lambda out, batch: out.argmax(1), "dtype torch.int64"),
        (lambda out, batch: out.tolist(), "returned list"),
        (lambda out, batch: out[:, 7], "readout raised IndexError"),
        (5, "out of range: the model has 2 outputs"),
    ],
)
def test_readout_of_the_wrong_shape_or_not_differentiable(readout, match):
    with pytest.raises(ef.ReadoutError, match=match):
        dual_of(readout=readout).features(X)


def test_readout_spec_of_the_wrong_kind():
    with pytest.raises(ef.ConfigError, match="readout must be"):
        dual_of(readout="logits")


# ---- parameters no rule or fallback can handle ----------------------------------------------------------------
class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()


class Gated(nn.Module):
    """A raw parameter (no factored rule) behind an op without a derivative: no rule and no fallback can run."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.s = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return _NoBackward.apply(self.lin(x) * self.s)


def test_parameter_without_rule_or_working_fallback():
    model = Gated()
    init = {k: v + 0.1 for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)
        with pytest.raises(ef.UnsupportedModelError, match=r"in <root> \(Gated\): a custom autograd"):
            ef.DualModel(model, init, progress=False).features(X)


def test_model_without_parameters():
    with pytest.raises(ef.UnsupportedModelError, match="no parameters"):
        ef.DualModel(nn.ReLU(), {})


# ---- memory ---------------------------------------------------------------------------------------------------
def test_dense_and_kernel_larger_than_memory_are_refused(monkeypatch):
    feats = dual_of().features(X)
    monkeypatch.setattr(efffeat._memory, "available_bytes", lambda: 1000)
    with pytest.raises(ef.MemoryBudgetError, match=r"dense feature matrix \[6, 2, 26\] would take 1.2 KiB.*matvec"):
        feats.dense()
    with pytest.raises(ef.MemoryBudgetError, match=r"kernel \[6, 2, 6, 2\] would take 576.0 B.*kernel_to_disk"):
        feats.kernel()
    monkeypatch.setattr(efffeat._memory, "available_bytes", lambda: 10**9)
    assert feats.kernel().shape == (6, 2, 6, 2)


# ---- feature ids ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fid", "match"),
    [
        ("0.wieght[1,1]", "Did you mean '0.weight'"),
        ("0.weight[1]", "take 2 indices"),
        ("0.weight[4,0]", "index 4 is out of range"),
        ("0.weight[1,:]", "names a group"),
        ("0.weight[a,1]", "not an integer"),
        (26, "position 26 is out of range for 26 features"),
        (-1, "position -1 is out of range"),
        (1.5, "got 1.5"),
        (None, "got None"),
    ],
)
def test_unknown_feature_ids(fid, match):
    feats = dual_of().features(X)
    with pytest.raises(ef.FeatureIdError, match=match):
        feats.column(fid)


def test_unknown_parameter_names():
    feats = dual_of().features(X)
    with pytest.raises(ef.FeatureIdError, match="no parameter called 'nope'"):
        feats.kernel(params=["nope"])
    with pytest.raises(ef.FeatureIdError):
        feats.contributions(["0.weight[9,9]"])


def test_features_of_another_architecture():
    torch.manual_seed(0)
    other = mlp(3, (5,), 2)
    theirs = ef.DualModel(other, perturbed(other, 0.1), progress=False).features(X)
    with pytest.raises(ef.ConfigError, match="different parameters"):
        dual_of().features(X).kernel(theirs)


# ---- empty data ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [torch.empty(0, 3), [], (torch.empty(0, 3), torch.empty(0)), [torch.empty(0, 3)]])
def test_empty_data(data):
    with pytest.raises(ef.DataError, match="empty"):
        dual_of().features(data)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8"])
def test_bad_batch_size(batch_size):
    with pytest.raises(ef.DataError, match="batch_size must be a positive integer"):
        dual_of().features(X, batch_size=batch_size)


# ---- train mode ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layer", "name"), [(nn.Dropout(0.1), "Dropout"), (nn.BatchNorm1d(4), "BatchNorm")])
def test_training_mode_with_random_or_batch_coupled_layers(layer, name):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with pytest.raises(ef.UnsupportedModelError, match=r"training mode .*\(1\).*model.eval\(\)"):
        ef.DualModel(model, init)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)  # batch norm has no factored rule
        assert ef.DualModel(model, init, progress=False).features(X).n_examples == 6


def test_training_mode_without_such_layers_is_fine():
    model, init = small()
    model.train()
    feats = ef.DualModel(model, init, progress=False).features(X)
    model.eval()
    again = ef.DualModel(model, init, progress=False).features(X)
    assert torch.equal(feats.kernel(), again.kernel())


# ---- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "second"}, "unknown order 'second'"),
        ({"nodes": 0}, "nodes must be a positive integer"),
        ({"dtype": torch.int32}, "floating torch.dtype"),
        ({"dtype": "float64"}, "floating torch.dtype"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ef.ConfigError, match=match):
        dual_of(**kwargs)


# ---- save files ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    return io.save(dual_of().features(X), tmp_path / "feats.safetensors")


def rewrite_header(path, **changes) -> None:
    """Edit header entries and sign the edit with a matching checksum, as a deliberate editor would."""
    with safe_open(str(path), framework="pt") as fh:
        header = {**fh.metadata(), **changes}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    header = {k: v for k, v in header.items() if v is not None}
    try:
        entries = {k: json.loads(v) if k in ("meta", "tensors") else v for k, v in header.items()}
        header["checksum"] = io._checksum(entries)
    except (KeyError, ValueError):
        pass  # a damaged entry: leave the checksum as it was
    save_file(tensors, str(path), metadata=header)


def test_truncated_save_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 17])
    with pytest.raises(ef.SaveFileError, match="corrupt or truncated"):
        io.load(saved)


def test_corrupt_tensor_bytes(saved):
    data = bytearray(saved.read_bytes())
    data[-9] ^= 0x40  # one bit of the last tensor's data
    saved.write_bytes(bytes(data))
    with pytest.raises(ef.SaveFileError, match="checksums"):
        io.load(saved)


def test_corrupt_header_bytes(saved):
    data = bytearray(saved.read_bytes())
    data[12] = ord("}")
    saved.write_bytes(bytes(data))
    with pytest.raises(ef.SaveFileError, match="corrupt or truncated"):
        io.load(saved)


def test_version_mismatch(saved):
    newer, now = io.FORMAT_VERSION + 1, io.FORMAT_VERSION
    rewrite_header(saved, format_version=str(newer))
    with pytest.raises(ef.SaveFileError, match=f"format version {newer}, this efffeat reads version {now}; upgrade"):
        io.load(saved)
    rewrite_header(saved, format_version=None)
    with pytest.raises(ef.SaveFileError, match="format version None"):
        io.load(saved)


def test_foreign_damaged_and_missing_files(saved, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ef.SaveFileError, match="not an efffeat save file"):
        io.load(plain)
    rewrite_header(saved, type="os:system")
    with pytest.raises(ef.SaveFileError, match="a type efffeat does not know"):
        io.load(saved)
    rewrite_header(saved, type="efffeat.features:EffectiveFeatures", meta='{"order": ')
    with pytest.raises(ef.SaveFileError, match="damaged 'meta'"):
        io.load(saved)
    rewrite_header(saved, meta='{"order": "nlo"}')
    with pytest.raises(ef.SaveFileError, match="state is invalid"):
        io.load(saved)
    for name, content in [("empty.safetensors", b""), ("junk.safetensors", b"\x00" * 3 + b"not a file" * 40)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ef.SaveFileError):
            io.load(tmp_path / name)
    with pytest.raises(ef.SaveFileError, match="does not exist"):
        io.load(tmp_path / "missing.safetensors")


# ---- fuzzing: no exception escapes untyped ----------------------------------------------------------------
def _readouts():
    fixed = st.sampled_from(["output"] * 4 + [0, 1, -1, 2, -3, 7, "out", 1.5, True, None])
    calls = st.sampled_from(
        [
            lambda out, batch: out[:, 0],
            lambda out, batch: out,
            lambda out, batch: out.sum(),
            lambda out, batch: out[:, :, None],
            lambda out, batch: out.detach(),
            lambda out, batch: out.argmax(-1),
            lambda out, batch: out.exp().log(),
            lambda out, batch: out[:, 5],
            lambda out, batch: None,
            lambda out, batch: out.square().sqrt() if out.shape[0] > 2 else out[:, 0],
        ]
    )
    return st.one_of(fixed, calls)


_DTYPES = st.sampled_from(
    [torch.float32] * 4 + [torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64]
)
_VALUES = st.sampled_from([0.0, 1.0, -3.0, 1e30, float("nan"), float("inf")])


@st.composite
def _data(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    if draw(st.integers(0, 3)):
        shape = (draw(st.integers(0, 5)), 3)
    dtype = draw(_DTYPES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    if x.numel() and dtype.is_floating_point and not draw(st.integers(0, 3)):
        x.reshape(-1)[draw(st.integers(0, x.numel() - 1))] = draw(_VALUES)
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "tuple", "list", "other"]))
    if kind == "tuple":
        return (x, torch.zeros(draw(st.integers(0, 5))))
    if kind == "list":
        return [x, x]
    if kind == "other":
        return draw(st.sampled_from([None, 3, "abc", {"x": x}, [None], [(x,)], [[x]]]))
    return x


def _escaped(fn) -> Exception | None:
    """Run fn; return the exception if it is not an efffeat error (None on success or an efffeat error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except ef.EfffeatError as e:
        event(type(e).__name__)
        return None
    except Exception as e:
        return e
    event("ok")
    return None


def _pipeline(data, batch_size=2, **kw) -> None:
    model, init = small()
    dual = ef.DualModel(model, init, progress=False, **kw)
    feats = dual.features(data, batch_size=batch_size)
    feats.kernel()
    feats.completeness()
    dual.completeness(data, batch_size=batch_size)


@settings(FUZZ, max_examples=60)
@given(data=_data(), readout=_readouts(), order=st.sampled_from(ef.ORDERS), batch_size=st.sampled_from([1, 2, 256]))
def test_fuzz_data_and_readouts(data, readout, order, batch_size):
    escaped = _escaped(lambda: _pipeline(data, batch_size, readout=readout, order=order, nodes=2))
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"


@FUZZ
@given(
    order=st.sampled_from([*ef.ORDERS, "NLO", 3, None]),
    nodes=st.sampled_from([1, 3, 0, -1, 2.0, True]),
    batch_size=st.sampled_from([1, 4, 0, -2, 1.5, None]),
    dtype=st.sampled_from([None, torch.float64, torch.float16, torch.int64, "float32"]),
)
def test_fuzz_configuration(order, nodes, batch_size, dtype):
    escaped = _escaped(lambda: _pipeline(X, batch_size, order=order, nodes=nodes, dtype=dtype))
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"


_FEATS = dual_of(readout="output", order="nlo").features(X)
_IDS = st.one_of(
    st.integers(-30, 30),
    st.text(max_size=12),
    st.sampled_from(["0.weight[1,2]", "0.weight[1,:]", "0.weight", "2.bias[]", "2.bias[1]", "2.bias[1,1]", "[", "]"]),
    st.from_regex(r"[02]\.(weight|bias)\[-?[0-9]{1,2}(,-?[0-9]{1,2})?\]", fullmatch=True),
    st.sampled_from([None, 1.0, b"0.weight[0,0]", torch.tensor(3), torch.tensor(2.0)]),
)


@st.composite
def _tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 30), max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64]))
    value = draw(_VALUES) if dtype.is_floating_point else draw(st.integers(-5, 5))
    return torch.full(shape, value, dtype=dtype)


@FUZZ
@given(ids=st.lists(_IDS, max_size=4), vector=_tensors(), params=st.lists(_IDS, max_size=2))
def test_fuzz_feature_accessors(ids, vector, params):
    feats = _FEATS
    calls = [
        lambda: feats.columns(ids),
        lambda: feats.contributions(ids),
        lambda: feats.matvec(vector),
        lambda: feats.rmatvec(vector),
        lambda: feats.sq_sums(vector),
        lambda: feats.kernel(params=params),
        lambda: [feats.ids.index(i) for i in ids],
        lambda: [feats.ids.parse(i) for i in ids],
    ]
    for call in calls:
        escaped = _escaped(call)
        assert escaped is None, f"{type(escaped).__name__}: {escaped}"


# ---- inputs and options of the honest engine ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: dual_of(forward="model(x)"), ef.ConfigError, "forward must be a callable"),
        (lambda: dual_of().features(X, need="readouts"), ef.ConfigError, "unknown need 'readouts'"),
        (lambda: dual_of().features(X, order="auto"), ef.ConfigError, "unknown order 'auto'"),
        (lambda: dual_of().features({"x": X, "y": X[:2]}), ef.DataError, "data dict have different lengths"),
        (lambda: dual_of().features({"x": "text"}), ef.DataError, "must hold tensors of model inputs"),
        (lambda: dual_of(order="auto").directional(X, {}), ef.ConfigError, "call dual.resolve_order"),
        (lambda: dual_of(forward=lambda m, b: m(b["x"])).features([object()]), ef.DataError, "number of examples"),
        (lambda: dual_of().features(X, need="features").completeness(), ef.ConfigError, "need='all'"),
    ],
)
def test_bad_engine_options_and_batches(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- zoo configs: every option checked, sizes bounded, before anything is built ---------------------------
@pytest.mark.parametrize(
    ("constructor", "options", "match"),
    [
        ("tms", {"n_features": "abc"}, "n_features must be a positive integer"),
        ("tms", {"n_features": 5.0}, "n_features must be a positive integer"),
        ("tms", {"n_hidden": True}, "n_hidden must be a positive integer"),
        ("tms", {"lr": float("nan")}, "lr must be a positive finite number"),
        ("tms", {"lr": float("inf")}, "lr must be a positive finite number"),
        ("tms", {"weight_decay": -1}, "weight_decay must be a non-negative finite number"),
        ("tms", {"importance": 2.0}, "importance must be at most 1"),
        ("tms", {"batch_size": 0}, "batch_size must be a positive integer"),
        ("tms", {"steps": 10**9}, "steps must be at most"),
        ("tms", {"seed": -1}, "seed must be an integer ≥ 0"),
        ("tms", {"n_features": 30_000, "n_hidden": 30_000, "n_data": 30_000}, "more than the"),
        ("digits_mlp", {"hidden": 32}, "hidden must be a list of 1 to"),
        ("digits_mlp", {"hidden": ()}, "hidden must be a list of 1 to"),
        ("digits_mlp", {"test_fraction": 1e-9}, "both splits"),
        ("digits_mlp", {"hidden": (1 << 20, 1 << 20)}, "more than the"),
        ("teacher_student", {"d": 1}, "d must be an integer ≥ 2"),
        ("teacher_student", {"k": 4, "d": 3}, "k must be even"),
        ("teacher_student", {"n_train": 10**7}, "more than the"),
        ("modular_addition", {"p": 2}, "p must be an integer ≥ 3"),
        ("modular_addition", {"d_model": 30, "n_heads": 4}, "divisible"),
        ("modular_addition", {"train_fraction": 1.0}, "train_fraction must be below 1"),
        ("modular_addition", {"p": 4000}, "more than the"),
    ],
)
def test_zoo_configs_are_checked_before_a_model_is_built(constructor, options, match, monkeypatch):
    import efffeat.zoo as zoo
    from efffeat.zoo import run as zoo_run

    def no_build(build, config):
        raise AssertionError(f"built a model of a bad config {config}")

    monkeypatch.setattr(zoo_run, "seeded_build", no_build)
    with pytest.raises(ef.ConfigError, match=re.escape(match)):
        getattr(zoo, constructor)(**options)


def test_zoo_configs_with_unknown_or_missing_options_are_refused():
    good = ef.zoo.tms(n_data=8, batch_size=4).config
    with pytest.raises(ef.ConfigError, match="unknown colour"):
        ef.zoo.Run({**good, "colour": "blue"})
    with pytest.raises(ef.ConfigError, match="missing lr"):
        ef.zoo.Run({k: v for k, v in good.items() if k != "lr"})
    with pytest.raises(ef.ConfigError, match="unknown zoo model kind"):
        ef.zoo.Run({**good, "kind": "os.system"})


def test_run_steps_are_checked():
    run = ef.zoo.tms(n_data=8, batch_size=4)
    for steps in (-1, 2.5, 10**9, "10"):
        with pytest.raises(ef.ConfigError, match="steps"):
            run.train(steps, progress=False)
    assert run.steps_done == 0
