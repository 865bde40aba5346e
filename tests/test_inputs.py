"""Model inputs as users pass them: token ids of any integer dtype, dicts of inputs (the Hugging Face way),
``(inputs, targets)`` tuples, a ``forward=`` callable for anything else; the model's own errors and its
precision reach the user with the batch they came from."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat._data import as_batches, batch_len, batch_to, check_finite_inputs, slice_batch

F64 = torch.float64


class MaskedTokens(nn.Module):
    """Embeds token ids, averages them over the positions the mask keeps, and reads two logits."""

    def __init__(self, vocab: int = 7, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, 2)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        if mask is not None:
            h = h * mask[..., None]
        return self.out(torch.tanh(h).mean(1))


def tokens_setup():
    torch.manual_seed(0)
    model = MaskedTokens().to(F64)
    init = perturbed(model, 0.2)
    ids = torch.randint(0, 7, (10, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(10, 5, dtype=F64)
    mask[:, 3:] = 0
    return model, init, ids, mask


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_token_ids_of_any_integer_dtype(dtype):
    """int32 ids, which the model accepts, used to end in a raw RuntimeError from one_hot."""
    model, init, ids, _ = tokens_setup()
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    want = dual.features(ids)
    got = dual.features(ids.to(dtype))
    assert torch.equal(got.kernel(), want.kernel()) and torch.equal(got.z_trained, want.z_trained)


# ---- dict batches and forward= -----------------------------------------------------------------------------
def test_dict_batches_reach_the_model_as_keyword_arguments():
    model, init, ids, mask = tokens_setup()
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    masked = dual.features({"ids": ids, "mask": mask})
    unmasked = dual.features({"ids": ids, "mask": torch.ones_like(mask)})
    assert float((masked.kernel() - unmasked.kernel()).abs().max()) > 1e-3  # the mask reaches the model
    with torch.no_grad():
        assert torch.allclose(masked.z_trained, model(ids, mask=mask), rtol=1e-13, atol=0)
    # the same data as a list of dict batches, a tuple (dict, targets) and a forward callable agree
    batches = [{"ids": ids[:4], "mask": mask[:4]}, {"ids": ids[4:], "mask": mask[4:]}]
    paired = [
        ({"ids": ids[:6], "mask": mask[:6]}, torch.zeros(6)),
        ({"ids": ids[6:], "mask": mask[6:]}, torch.zeros(4)),
    ]
    by_forward = ef.DualModel(
        model, init, order="nlo", progress=False, forward=lambda m, batch: m(batch[0], mask=batch[1])
    ).features((ids, mask, torch.arange(10)), batch_size=3)
    for feats in (
        dual.features(batches),
        dual.features(paired),
        dual.features({"ids": ids, "mask": mask}, 3),
        by_forward,
    ):
        torch.testing.assert_close(feats.kernel(), masked.kernel(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(feats.z_trained, masked.z_trained, rtol=1e-13, atol=0)
    assert dual.completeness({"ids": ids, "mask": mask}) == pytest.approx(masked.completeness(), rel=1e-9)


def test_the_readout_gets_the_whole_batch():
    model, init, ids, mask = tokens_setup()
    labels = torch.randint(0, 2, (10,))

    def correct_logit(out, batch):
        return out.gather(1, batch["labels"][:, None])[:, 0]

    dual = ef.DualModel(
        model,
        init,
        readout=correct_logit,
        order="init",
        progress=False,
        forward=lambda m, batch: m(batch["ids"], mask=batch["mask"]),
    )
    feats = dual.features({"ids": ids, "mask": mask, "labels": labels, "note": "not a tensor"}, batch_size=4)
    with torch.no_grad():
        assert torch.allclose(feats.z_trained[:, 0], model(ids, mask).gather(1, labels[:, None])[:, 0])


def test_dict_batch_helpers_slice_move_measure_and_check():
    ids, mask = torch.arange(12).reshape(6, 2), torch.ones(6, 2, dtype=F64)
    batch = {"ids": ids, "mask": mask, "shared": torch.zeros(1, 2), "name": "x"}
    assert batch_len(batch) == 6
    part = slice_batch(batch, slice(1, 3))
    assert torch.equal(part["ids"], ids[1:3]) and part["shared"].shape == (1, 2) and part["name"] == "x"
    moved = batch_to(batch, torch.device("cpu"), torch.float32)
    assert moved["mask"].dtype == torch.float32 and moved["ids"].dtype == torch.int64 and moved["name"] == "x"
    assert [batch_len(b) for b in as_batches(batch, 4)] == [4, 2] and as_batches(batch, 4).n_examples == 6
    mask[4, 1] = float("inf")
    with pytest.raises(ef.NonFiniteError, match="input example 14 contains NaN"):
        check_finite_inputs(batch, offset=10)
    with pytest.raises(ef.DataError, match="different lengths"):
        as_batches({"ids": ids, "mask": mask[:3]}, 2)
    with pytest.raises(ef.DataError, match="must hold tensors of model inputs"):
        as_batches({"name": "x"}, 2)


def test_a_hugging_face_model_with_dict_batches():
    """BertModel built offline; the mask reaches the model; the dict path equals a hand-written wrapper."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config._attn_implementation = "eager"  # sdpa has no forward-mode derivative (order 'nlo', completeness)
    model = transformers.BertModel(config)
    with pytest.raises(ef.UnsupportedModelError, match="Dropout"):  # a fresh model is in training mode
        ef.DualModel(model, {})
    model.eval()
    init = perturbed(model, 0.02)
    ids = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:, 5:] = 0
    positions = torch.arange(7).expand(6, 7)  # per-example position ids keep the position embedding factored
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": positions,
    }

    def pooled(out, batch):
        return out.pooler_output[:, :3]

    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.FallbackWarning)
        warnings.simplefilter("ignore", ef.CompletenessWarning)
        dual = ef.DualModel(model, init, readout=pooled, order="path", nodes=2, progress=False)
        feats = dual.features(batch, batch_size=4)
        unmasked = dual.features({**batch, "attention_mask": torch.ones_like(mask)})
    assert float((feats.kernel() - unmasked.kernel()).abs().max()) > 1e-4
    assert dual.completeness(batch) == pytest.approx(feats.completeness(), rel=1e-4)

    class Wrapper(nn.Module):  # what users had to write before
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, x):
            return self.bert(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2], position_ids=x[:, 3])

    wrapped = Wrapper()
    packed = torch.stack([ids, mask, torch.zeros_like(ids), positions], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.CompletenessWarning)
        ref = ef.DualModel(
            wrapped, {f"bert.{k}": v for k, v in init.items()}, readout=pooled, order="path", nodes=2, progress=False
        ).features(packed)
    torch.testing.assert_close(feats.kernel(), ref.kernel(), rtol=1e-5, atol=1e-7)


# ---- the model's errors, with the batch ----------------------------------------------------------------------
class RaisesOnLargeInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if bool((x[:, 0] > 2.5).any()):
            raise RuntimeError("value too large for this model")
        return self.lin(x)


class RaisesInCapture(nn.Module):
    """Runs without gradients (as in a plain forward) and raises when autograd records (as in the capture)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise ValueError("no gradients through this model")
        return self.lin(x)


def test_the_models_own_error_is_a_data_error_naming_the_batch():
    model = RaisesOnLargeInputs()
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    x[23, 0] = 3.0
    dual = ef.DualModel(model, perturbed(model, 0.1), order="nlo", progress=False)
    with pytest.raises(
        ef.DataError, match=r"batch 2 \(examples 16–23; inputs of shape \(8, 3\).*value too large"
    ) as info:
        dual.features(x, batch_size=8)
    assert isinstance(info.value.__cause__, RuntimeError)
    model = RaisesInCapture()
    with pytest.raises(ef.DataError, match=r"batch 0 \(examples 0–4.*ValueError: no gradients through this model"):
        ef.DualModel(model, perturbed(model, 0.1), order="nlo", progress=False).features(x[:5])


def test_a_readout_error_names_the_batch():
    model = mlp(3, (4,), 2)
    x = torch.randn(9, 3).clamp(-2, 2)
    x[8, 0] = 9.0

    def first_logit(out, batch):
        return out[:, 0] if bool((batch[:, 0] < 5).all()) else out[:, 5]

    dual = ef.DualModel(model, perturbed(model, 0.1), readout=first_logit, order="init", progress=False)
    with pytest.raises(ef.ReadoutError, match=r"readout raised IndexError.*\(batch 2, example 8\)"):
        dual.features(x, batch_size=4)


def test_an_operation_without_forward_mode_derivatives_gets_a_clear_error():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return NoForwardAD.apply(self.lin(x))

    model = Model()
    dual = ef.DualModel(model, perturbed(model, 0.1), order="nlo", progress=False)
    with pytest.raises(ef.UnsupportedModelError, match="no forward-mode derivative.*order='path'"):
        dual.features(torch.randn(4, 3))
    assert ef.DualModel(model, perturbed(model, 0.1), order="path", progress=False).features(torch.randn(4, 3))


# ---- precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_below_float32_gets_a_precision_note(dtype):
    torch.manual_seed(0)
    model = mlp(3, (8,), 2)
    init = perturbed(model, 0.1)
    x = torch.randn(10, 3)
    with pytest.warns(ef.PrecisionWarning, match=f"computes in {dtype}"):
        dual = ef.DualModel(model.to(dtype), {k: v.to(dtype) for k, v in init.items()}, order="nlo", progress=False)
    feats = dual.features(x)
    assert feats.dtype == dtype and str(dtype) in feats.meta["precision_note"]
    assert ef.Analysis(dual, x, features=feats).notes[0] == dual.precision_note
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.PrecisionWarning)
        copied = ef.DualModel(model, init, order="nlo", dtype=torch.float32, progress=False)
        full = copied.features(x)
    assert full.meta["precision_note"] is None and ef.Analysis(copied, x, features=full).notes == []


def test_dashboards_draw_dict_batches_from_their_token_ids():
    model, init, ids, mask = tokens_setup()
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    batch = {"ids": ids, "mask": mask}
    feats = dual.features(batch)
    labels = torch.arange(10) % 2
    from_dict = ef.viz.feature_dashboard(dual, "out.weight[1,:]", data={**batch, "labels": labels}, features=feats)
    from_tuple = ef.viz.feature_dashboard(dual, "out.weight[1,:]", data=(ids, labels), features=feats)
    assert from_dict.examples_html == from_tuple.examples_html and "ef-tok" in from_dict.examples_html
    with pytest.raises(ef.DataError, match="a dict of tensors"):
        ef.viz.feature_dashboard(dual, "out.weight[1,:]", data={"ids": [1, 2]}, features=feats)
