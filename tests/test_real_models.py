"""Bring your own model: convolutions, attention, recurrent layers, batch-statistics norms and Hugging Face BERT.

Every order against per-example autograd (`_reference.py`, float64 ≤ 1e-10), which modules fall back and how,
the settings efffeat restores, and that no raw PyTorch exception reaches the user.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import init_params, params_of, perturbed
from _reference import reference_features, rel_err
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import efffeat as ef
import efffeat._memory

ORDERS = ["init", "nlo", "trained", "path"]
F64 = torch.float64


def check(model, x, order, readout="output", ref_readout=lambda out: out, step=0.1, tol=1e-10, dtype=F64):
    """Features of `order` against the autograd reference; returns (dual, feats, fallback warnings)."""
    model = model.to(dtype).eval()
    init = perturbed(model, step)
    x = x.to(dtype) if x.is_floating_point() else x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dual = ef.DualModel(model, init, readout=readout, order=order, nodes=2, progress=False)
        feats = dual.features(x, batch_size=3)
    with sdpa_kernel(SDPBackend.MATH):  # plain PyTorch's flash attention has no double backward
        ref = reference_features(model, init_params(model, init), params_of(model), x, ref_readout, order, 2)
    dense = feats.dense()
    dense = dense[:, None] if feats.scalar else dense
    assert rel_err(dense, ref) <= tol
    return dual, feats, [str(w.message) for w in caught if issubclass(w.category, ef.FallbackWarning)]


# ---- convolutions ------------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv2d with stride 2, padding and 2 groups; a dilated 'same' Conv2d with reflect padding; a Conv1d."""

    def __init__(self, second: nn.Module | None = None, one_d: nn.Module | None = None):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.c2 = second or nn.Conv2d(4, 4, 3, dilation=2, padding="same", padding_mode="reflect")
        self.pool = nn.MaxPool2d(2)
        self.c3 = one_d or nn.Conv1d(4, 3, 2, padding=1, dilation=2)
        self.out = nn.LazyLinear(2)

    def forward(self, x):
        h = self.pool(torch.tanh(self.c2(torch.tanh(self.c1(x)))))  # [N, 4, 2, 2]
        h = torch.tanh(self.c3(h.flatten(2)))  # [N, 3, L]
        return self.out(h.flatten(1))


def conv_net(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(**kw)
    model(torch.randn(1, 2, 9, 9))  # materialise the lazy head
    return model


@pytest.mark.parametrize("order", ORDERS)
def test_cnn_every_order_is_factored_and_exact(order):
    dual, feats, fell_back = check(conv_net(), torch.randn(5, 2, 9, 9), order)
    assert fell_back == [] and dual.fallback_params == []
    assert "c1.weight" in feats.factors and ef.DualModel.supported(dual.model).fallback == {}


@pytest.mark.parametrize(
    "second, one_d",
    [
        (
            lambda: nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(2, 1), bias=False),
            lambda: nn.Conv1d(4, 3, 3, stride=2),
        ),
        (
            lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4),
            lambda: nn.Conv1d(4, 6, 3, padding="same"),
        ),
        (lambda: nn.Conv2d(4, 4, 2, padding="same", padding_mode="replicate"), lambda: nn.Conv1d(4, 4, 1, groups=2)),
        (lambda: nn.Conv2d(4, 4, 2, dilation=(2, 1)), lambda: nn.Conv1d(4, 3, 3, padding=1, padding_mode="reflect")),
    ],
    ids=["strided-nonsquare", "circular-depthwise", "same-even-replicate", "dilated"],
)
@pytest.mark.parametrize("order", ["init", "nlo"])
def test_conv_variants(second, one_d, order):
    _, _, fell_back = check(conv_net(second=second(), one_d=one_d()), torch.randn(4, 2, 9, 9), order)
    assert fell_back == []


@pytest.mark.parametrize("order", ["init", "nlo"])
def test_conv_with_few_positions_and_wide_channels_keeps_rank_terms(order):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, groups=2),  # 5x5 -> 2x2: dense
        nn.Tanh(),
        nn.Conv2d(6, 48, 2, groups=3),  # one position, 48 channels: rank terms
        nn.Tanh(),
        nn.Flatten(),
        nn.Unflatten(1, (1, 48)),
        nn.Conv1d(1, 5, 4, stride=4),  # 12 positions of 4 taps: dense
        nn.Flatten(),
        nn.Linear(60, 2),
    )
    _, feats, fell_back = check(model, torch.randn(4, 2, 5, 5), order)
    assert fell_back == []
    assert type(feats.factors["2.weight"]).__name__ == "LowRankFactor"
    assert type(feats.factors["0.weight"]).__name__ == "DenseFactor"


# ---- attention ---------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """nn.TransformerEncoder (batch_first) with a key padding mask read off all-zero positions; pooled readout."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        pad = x.abs().sum(-1) == 0  # [N, T]
        h = self.enc(x, src_key_padding_mask=pad if bool(pad.any()) else None)
        keep = (~pad).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def tokens(n: int = 4, t: int = 5, padded: bool = True) -> torch.Tensor:
    x = torch.randn(n, t, 8, generator=torch.Generator().manual_seed(1))
    if padded:
        x[0, -2:] = 0
        x[2, -1:] = 0
    return x


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "key-padding-mask"])
@pytest.mark.parametrize("order", ORDERS)
def test_transformer_encoder_every_order(order, padded):
    torch.manual_seed(2)
    dual, _, fell_back = check(Encoder(norm_first=padded), tokens(padded=padded), order)
    assert fell_back == [] and dual.fallback_params == []


def test_transformer_encoder_out_proj_belongs_to_the_attention_rule():
    torch.manual_seed(2)
    report = ef.DualModel.supported(Encoder())
    assert report.fallback == {}
    assert "via MultiheadAttentionRule" in report.factored["enc.layers.0.self_attn.out_proj.weight"]
    assert "via LinearRule" in report.factored["enc.layers.0.linear1.weight"]


class Attend(nn.Module):
    """nn.MultiheadAttention called directly: self or cross attention, kdim/vdim, sequence-first layouts, and masks
    made per example from the input (so that one example alone gets its own)."""

    def __init__(self, kdim=None, batch_first=True, self_attention=False, masks=(), **call):
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 3, kdim=kdim, vdim=kdim, batch_first=batch_first)
        self.kv = nn.Linear(6, kdim or 6)
        self.call, self.batch_first, self.self_attention, self.masks = call, batch_first, self_attention, masks

    def forward(self, x):  # x [N, T, 6]
        n, t = x.shape[:2]
        memory = torch.tanh(self.kv(x.flip(1)))
        q, kv = (x, memory) if self.batch_first else (x.transpose(0, 1), memory.transpose(0, 1))
        kv = q if self.self_attention else kv
        masks = {}
        if "causal" in self.masks:
            masks["attn_mask"] = torch.ones(t, t, dtype=torch.bool).triu(1)
        if "float" in self.masks:
            masks["attn_mask"] = torch.linspace(-1, 1, t * t, dtype=x.dtype).reshape(t, t)
        if "per-example" in self.masks:  # [N·H, T, T] boolean, the diagonal always open
            closed = (x[..., :1] * x[..., :1].transpose(1, 2) > 0.5) & ~torch.eye(t, dtype=torch.bool)
            masks["attn_mask"] = closed.repeat_interleave(self.mha.num_heads, 0)
        if "padding" in self.masks:  # the last key of examples whose first entry is positive
            padding = (x[:, :1, :1] > 0).reshape(n, 1) & (torch.arange(t) == t - 1)
            float_mask = masks.get("attn_mask", padding).is_floating_point()  # both masks of one kind
            masks["key_padding_mask"] = padding.to(x.dtype).masked_fill(padding, -torch.inf) if float_mask else padding
        out, weights = self.mha(q, kv, kv, **masks, **self.call)
        out = out if self.batch_first else out.transpose(0, 1)
        extra = 0 if weights is None else weights.flatten(1).sum(1, keepdim=True)
        return out.flatten(1) + extra


@pytest.mark.parametrize(
    "make",
    [
        lambda: Attend(),
        lambda: Attend(masks=("causal",), need_weights=False, is_causal=True),
        lambda: Attend(kdim=5, masks=("float", "padding")),
        lambda: Attend(batch_first=False, masks=("padding",)),
        lambda: Attend(batch_first=False, self_attention=True, need_weights=False),
        lambda: Attend(average_attn_weights=False, masks=("per-example",)),
    ],
    ids=["cross+weights", "causal", "kdim+float+padding", "seq-first+padding", "seq-first-self", "per-head+3d-mask"],
)
@pytest.mark.parametrize("order", ["init", "nlo"])
def test_multihead_attention_variants(make, order):
    torch.manual_seed(3)
    _, _, fell_back = check(make(), torch.randn(3, 4, 6), order)
    assert fell_back == []


def test_attention_the_rule_does_not_handle_goes_exactly_to_the_fallback():
    torch.manual_seed(3)
    model = Attend()
    model.mha = nn.MultiheadAttention(6, 3, add_bias_kv=True, batch_first=True)
    dual, _, fell_back = check(model, torch.randn(3, 4, 6), "nlo")
    assert "mha.bias_k" in dual.fallback_params and "mha.out_proj.weight" in dual.fallback_params
    assert "mha.out_proj (NonDynamicallyQuantizableLinear): weight, bias (the module is not called" in fell_back[0]


def test_group_head_on_multihead_attention():
    torch.manual_seed(2)
    model = Encoder().to(F64).eval()
    dual = ef.DualModel(model, perturbed(model, 0.1), readout=0, progress=False)
    feats = dual.features(tokens().to(F64))
    assert feats.meta["n_heads"] == 2
    table = ef.rank(feats, group="head")
    assert sorted(table.ids) == [f"enc.layers.{i}.self_attn.head[{h}]" for i in range(2) for h in range(2)]
    e, d = 8, 4
    assert all(size == 3 * (d * e + d) + e * d for size in table.sizes.tolist())
    # head 1 of layer 0: rows 4..7 of each q/k/v block of in_proj_weight, columns 4..7 of out_proj.weight
    pos = ef.groups.group_positions(feats.ids, "enc.layers.0.self_attn.head[1]", 2)
    chosen = {feats.ids[i] for i in pos.tolist()}
    attn = "enc.layers.0.self_attn"
    assert f"{attn}.in_proj_weight[12,0]" in chosen and f"{attn}.in_proj_bias[20]" in chosen
    assert f"{attn}.in_proj_weight[8,0]" not in chosen
    assert f"{attn}.out_proj.weight[0,5]" in chosen and f"{attn}.out_proj.weight[5,0]" not in chosen


# ---- recurrent layers: step by step, factored; packed sequences through the per-example loop ----------------------
class Recurrent(nn.Module):
    """A recurrent layer read at the last step (sequence-first layers are fed [T, N, ·]); `state` passes h0 (and c0)."""

    def __init__(self, kind: str, state: bool = False, **options):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 5, **options)
        self.out = nn.Linear(5 * (2 if options.get("bidirectional") else 1), 2)
        self.batch_first, self.state = options.get("batch_first", False), state

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.state:  # an initial state that depends on the example
            rnn = self.rnn
            h0 = (
                torch.tanh(x[:, 0, :1])
                .expand(-1, rnn.hidden_size)[None]
                .repeat(rnn.num_layers * (1 + rnn.bidirectional), 1, 1)
            )
            y = rnn(seq, (h0, 2 * h0) if isinstance(rnn, nn.LSTM) else h0)[0]
        else:
            y = self.rnn(seq)[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return self.out(y[:, -1])


RECURRENT = [
    dict(batch_first=True),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, bias=False, num_layers=2),
]


@pytest.mark.parametrize("options", RECURRENT, ids=["batch-first", "2-layer-bidirectional", "no-bias"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("order", ORDERS)
def test_recurrent_layers_are_factored_step_by_step(kind, options, order):
    torch.manual_seed(4)
    dual, _, fell_back = check(Recurrent(kind, **options), torch.randn(4, 6, 3), order)
    assert dual.fallback_params == [] and fell_back == []
    support = ef.DualModel.supported(dual.model)
    assert [n for n in support.factored if n.startswith("rnn.")] == [
        n for n, _ in dual.model.rnn.named_parameters(prefix="rnn")
    ]
    assert all("via RecurrentRule" in how for n, how in support.factored.items() if n.startswith("rnn."))


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_recurrent_layers_with_an_initial_state_and_relu(kind):
    torch.manual_seed(8)
    check(Recurrent(kind, state=True, batch_first=True, bidirectional=True), torch.randn(4, 6, 3), "nlo")
    if kind == "RNN":
        check(Recurrent(kind, nonlinearity="relu", batch_first=True), torch.randn(4, 6, 3), "nlo")


class Packed(nn.Module):
    """A GRU over packed sequences of different lengths: its rule declines them, the per-example loop runs it."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        lengths = (x.abs().sum(-1) != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.out(self.rnn(packed)[1][0])


@pytest.mark.parametrize("order", ORDERS)
def test_packed_sequences_go_through_the_per_example_loop(order):
    torch.manual_seed(4)
    x = torch.randn(4, 6, 3)
    x[1, 4:] = 0
    x[3, 2:] = 0
    dual, _, fell_back = check(Packed(), x, order)
    assert dual.fallback_params == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    assert len(fell_back) == 1
    assert "rnn (GRU): weight_ih_l0" in fell_back[0] and "its rule does not take this call" in fell_back[0]
    assert "one example at a time" in fell_back[0] and "ms per example" in fell_back[0]


def test_an_lstm_with_projections_goes_to_the_per_example_loop():
    torch.manual_seed(9)
    model = Recurrent("LSTM", batch_first=True, proj_size=2)
    model.out = nn.Linear(2, 2)
    dual, _, fell_back = check(model, torch.randn(4, 6, 3), "nlo")
    assert "rnn.weight_hr_l0" in dual.fallback_params and "its rule does not take this call" in fell_back[0]


def test_float32_lstm_nlo_and_completeness_need_no_forward_mode_kernel():
    """float32 nn.LSTM runs aten::mkldnn_rnn_layer, which has no forward-mode derivative."""
    torch.manual_seed(5)
    model = Recurrent("LSTM")
    x = torch.randn(4, 6, 3)
    mkldnn = torch.backends.mkldnn.enabled
    dual, feats, _ = check(model, x, "nlo", dtype=torch.float32, tol=1e-4, step=0.05)
    assert abs(dual.completeness(x) - feats.completeness()) <= 1e-4
    assert torch.backends.mkldnn.enabled == mkldnn


class Gated(nn.Module):
    """Data-dependent control flow on a raw parameter: vmap cannot run it, the per-example loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.s = nn.Parameter(torch.ones(2))

    def forward(self, x):
        h = self.lin(x)
        return h * self.s if bool((h > -1e9).all()) else h


@pytest.mark.parametrize("order", ["init", "nlo"])
def test_data_dependent_control_flow_through_the_loop(order):
    torch.manual_seed(6)
    dual, _, fell_back = check(Gated(), torch.randn(5, 3), order)
    assert dual.fallback_params == ["s"] and "<root> (Gated): s (no factored rule" in fell_back[0]


@pytest.mark.parametrize("available, chunk", [(4000, 1), (10**12, 3)])
def test_vmap_chunks_follow_the_memory_budget(monkeypatch, available, chunk):
    from _models import Scale

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    init = perturbed(model, 0.1)
    x = torch.randn(5, 3, dtype=F64)
    with monkeypatch.context() as patch, pytest.warns(ef.FallbackWarning) as caught:
        patch.setattr(efffeat._memory, "available_bytes", lambda: available)
        feats = ef.DualModel(model, init, order="nlo", progress=False).features(x, batch_size=3)
    assert f"vmap(jacrev), {chunk} examples per chunk (from the memory budget)" in str(caught[0].message)
    ref = reference_features(model, init_params(model, init), params_of(model), x, lambda out: out, "nlo")
    assert rel_err(feats.dense(), ref) <= 1e-10


# ---- norms -------------------------------------------------------------------------------------------------------
def norm_net(norm: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 6)
            self.norm = norm
            self.out = nn.Linear(6, 2)

        def forward(self, x):  # x [N, *shape, 3]
            h = self.inp(x).movedim(-1, 1) if not isinstance(norm, nn.RMSNorm) else self.inp(x)
            h = torch.tanh(self.norm(h))
            h = h.movedim(1, -1) if not isinstance(norm, nn.RMSNorm) else h
            return self.out(h.reshape(h.shape[0], -1, 6).mean(1))

    torch.manual_seed(8)
    net = Net()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
        with torch.no_grad():
            norm.running_mean.normal_(0, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
    return net


NORMS = [
    (lambda: nn.BatchNorm1d(6), ()),
    (lambda: nn.BatchNorm1d(6), (4,)),
    (lambda: nn.BatchNorm2d(6), (3, 2)),
    (lambda: nn.GroupNorm(3, 6), (4,)),
    (lambda: nn.GroupNorm(1, 6), (2, 2)),
    (lambda: nn.RMSNorm(6), (4,)),
    (lambda: nn.RMSNorm([4, 6], eps=1e-6), (4,)),
]


@pytest.mark.parametrize("make, shape", NORMS, ids=["bn1d", "bn1d-seq", "bn2d", "gn3", "gn1", "rms", "rms2d"])
@pytest.mark.parametrize("order", ORDERS)
def test_norm_layers_are_factored(make, shape, order):
    model = norm_net(make(), shape)
    dual, _, fell_back = check(model, torch.randn(5, *shape, 3), order)
    assert fell_back == [] and dual.fallback_params == []


def test_batch_statistics_are_refused_naming_the_module():
    model = norm_net(nn.BatchNorm1d(6), (4,))
    init = perturbed(model, 0.1)
    x = torch.randn(5, 4, 3)
    model.eval()
    model.norm.train()  # one layer left in training mode inside an eval model
    with pytest.raises(ef.UnsupportedModelError, match=r"norm: BatchNorm1d normalises by the batch.s statistics.*eval"):
        ef.DualModel(model, init, progress=False).features(x)
    no_stats = norm_net(nn.BatchNorm1d(6, track_running_stats=False, affine=False), (4,)).eval()
    with pytest.raises(ef.UnsupportedModelError, match=r"norm: BatchNorm1d has no running statistics"):
        ef.DualModel(no_stats, perturbed(no_stats, 0.1), progress=False).features(x)


# ---- embeddings broadcast over the batch, Linear subclasses --------------------------------------------------------
class Positions(nn.Module):
    """A position embedding looked up with ids [1, T]: its output has a batch axis of 1."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.out(torch.tanh(h)).sum(1)


@pytest.mark.parametrize("order", ORDERS)
def test_batch_broadcast_embedding_is_expanded(order):
    torch.manual_seed(9)
    dual, _, fell_back = check(Positions(), torch.randint(0, 7, (5, 4)), order)
    assert fell_back == [] and dual.fallback_params == []


class SameLinear(nn.Linear):
    pass


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward differs: the first-batch check moves it to the fallback."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclasses():
    torch.manual_seed(10)
    same = nn.Sequential(SameLinear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    dual, _, fell_back = check(same, torch.randn(5, 3), "nlo")
    assert fell_back == [] and "via LinearRule" in ef.DualModel.supported(same).factored["0.weight"]
    scaled = nn.Sequential(ScaledLinear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    dual, _, fell_back = check(scaled, torch.randn(5, 3), "nlo")
    assert dual.fallback_params == ["0.weight", "0.bias"] and "differs from autograd's" in fell_back[0]


# ---- Hugging Face BERT -------------------------------------------------------------------------------------------
def small_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
    )
    torch.manual_seed(11)
    bert = transformers.BertModel(config).eval()

    class Packed(nn.Module):
        """ids and attention mask packed in one tensor [N, 2, T]; the default (batch-1) position ids."""

        def __init__(self):
            super().__init__()
            self.bert = bert
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            ids, mask = x[:, 0], x[:, 1]
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1)).squeeze(-1)

    ids = torch.randint(1, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return Packed(), torch.stack([ids, mask], 1)


@pytest.mark.parametrize("order", ["init", "nlo"])
def test_hugging_face_bert_without_position_ids(order):
    model, x = small_bert()
    dual, _, fell_back = check(model, x, order, readout=lambda out, batch: out, ref_readout=lambda out: out[:, None])
    assert fell_back == [] and dual.fallback_params == []


def test_group_head_on_hugging_face_bert():
    model, x = small_bert()
    model = model.to(F64)
    feats = ef.DualModel(model, perturbed(model, 0.05), readout=lambda out, batch: out, progress=False).features(x)
    assert feats.meta["n_heads"] == 2
    table = ef.rank(feats, group="head")
    prefix = "bert.encoder.layer.0.attention"
    assert sorted(table.ids) == [f"{prefix}.head[0]", f"{prefix}.head[1]"]
    assert all(size == 3 * (8 * 16 + 8) + 16 * 8 for size in table.sizes.tolist())
    chosen = {feats.ids[i] for i in ef.groups.group_positions(feats.ids, f"{prefix}.head[1]", 2).tolist()}
    assert f"{prefix}.self.value.weight[9,3]" in chosen and f"{prefix}.self.key.bias[15]" in chosen
    assert f"{prefix}.output.dense.weight[0,8]" in chosen and f"{prefix}.self.query.weight[7,0]" not in chosen


# ---- the dual model by forward mode: the layer-norm workaround ------------------------------------------------------
def test_nlo_completeness_by_forward_mode_equals_the_features_with_layer_norm():
    """torch 2.13's second-order forward derivative of F.layer_norm is wrong (pytorch/pytorch#196700)."""
    torch.manual_seed(12)
    layers = [nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 1)]
    model = nn.Sequential(*layers).to(F64)
    init = perturbed(model, 0.05)
    x = torch.randn(16, 3, dtype=F64)
    dual = ef.DualModel(model, init, readout=0, order="nlo", progress=False)
    by_features = dual.features(x).completeness()
    assert by_features < 0.5
    assert abs(dual.completeness(x) - by_features) <= 1e-10
    feats = dual.features(x)
    assert rel_err(dual.predict(x).reshape(-1), feats.prediction().reshape(-1)) <= 1e-12


# ---- settings restored, errors that name the module ------------------------------------------------------------------
def test_user_backend_settings_survive_every_exit():
    torch.manual_seed(13)
    model = Encoder().to(F64).eval()
    x = tokens().to(F64)
    init = perturbed(model, 0.1)
    cuda = torch.backends.cuda
    before = (torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled)
    cuda.enable_mem_efficient_sdp(False)  # a user's own choice
    try:
        ef.DualModel(model, init, progress=False).completeness(x)
        with pytest.raises(ef.ReadoutError):
            ef.DualModel(model, init, readout=lambda out, batch: out.argmax(1).double(), progress=False).features(x)
        assert (torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled) == before
        assert cuda.math_sdp_enabled() and cuda.flash_sdp_enabled() and not cuda.mem_efficient_sdp_enabled()
        assert "forward" not in model.enc.layers[0].self_attn.__dict__  # the rule's forward is gone again
        calls = []

        def fails_in_the_capture(out, batch):  # 1: the readout at θ*, 2: the plan's gradient, 3: the capture
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a readout that fails in the capture pass")
            return out[:, 0]

        with pytest.raises(ef.ReadoutError, match="fails in the capture"):
            ef.DualModel(model, init, readout=fails_in_the_capture, order="init", progress=False).features(x)
        assert len(calls) == 3 and "forward" not in model.enc.layers[0].self_attn.__dict__
        assert (torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled) == before
    finally:
        cuda.enable_mem_efficient_sdp(True)


class NoForwardMode(torch.autograd.Function):
    """An op with a backward but no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)


class Opaque(nn.Module):
    def forward(self, x):
        return NoForwardMode.apply(x)


def test_no_raw_exception_when_forward_mode_is_missing():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), Opaque(), nn.Linear(4, 1)).to(F64)
    init = perturbed(model, 0.1)
    x = torch.randn(5, 3, dtype=F64)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    with pytest.raises(ef.UnsupportedModelError, match=r"in 1 \(Opaque\).*no forward-mode derivative.*order='path'"):
        dual.features(x)
    with pytest.raises(ef.UnsupportedModelError, match=r"in 1 \(Opaque\).*setup_context.*order='path'"):
        dual.completeness(x)
    feats = ef.DualModel(model, init, order="path", progress=False).features(x)  # reverse mode only: fine
    assert feats.completeness() < 1e-2


class Squeezed(nn.Module):
    """A model that works on batches but not on one example (``squeeze`` drops the batch axis)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = (x * self.s).squeeze()
        return self.out(h if h.ndim == 2 else h[:, None])


def test_a_model_no_route_can_analyse_raises_an_efffeat_error_naming_the_module():
    model = Squeezed().to(F64)
    init = perturbed(model, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)
        with pytest.raises(ef.UnsupportedModelError) as caught:
            ef.DualModel(model, init, progress=False).features(torch.randn(4, 3, dtype=F64))
    message = str(caught.value)
    assert "exact per-example nlo features of <root> (Squeezed): s in out (Linear)" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message and "vmap could not run it either" in message
    assert not isinstance(caught.value.__cause__, ef.EfffeatError)  # PyTorch's error, kept as the cause


class EncoderAllPositions(nn.Module):
    """A smooth (GELU) encoder read at every position, padded ones included (where PyTorch's fast path, taken
    by a plain forward with a padding mask, writes zeros)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)  # nested tensors on, as by default
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        pad = x.abs().sum(-1) == 0
        return self.head(self.enc(x, src_key_padding_mask=pad)).sum(1)


def test_readouts_and_features_take_the_same_attention_path():
    torch.manual_seed(0)
    model = EncoderAllPositions().eval()
    init = perturbed(model, 0.02)
    feats = ef.DualModel(model, init, order="path", nodes=6, progress=False).features(tokens(), need="all")
    assert feats.completeness() < 1e-4  # z from a fast-path forward would not match the slow-path features
