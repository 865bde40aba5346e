"""Sequence models: the named readouts of `ef.readouts`, TransformerLens hook names, and token dashboards."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import bridge, perturbed

import efffeat as ef

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny_bridge():
    """A 2-layer attention TransformerBridge (vocabulary 11, 5 positions), θ0 a seeded step away, and tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge(n_layers=2, d_vocab=11, n_ctx=5, normalization=None, seed=1)
    model.eval()
    init = perturbed(model, 0.05, seed=2)
    tokens = torch.randint(0, 11, (12, 5), generator=torch.Generator().manual_seed(3))
    return model, init, tokens


def test_logit_readouts_read_the_token_at_the_position():
    logits = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 7, (4, 5))
    answers, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 6, 5, 1])
    assert torch.equal(ef.readouts.logit(3, position=1)(logits, tokens), logits[:, 1, 3])
    assert torch.equal(ef.readouts.logit()(logits, (tokens, answers)), logits[:, -1][torch.arange(4), answers])
    diff = ef.readouts.logit_diff(position=2)(logits, (tokens, answers, wrong))
    assert torch.equal(diff, logits[:, 2][torch.arange(4), answers] - logits[:, 2][torch.arange(4), wrong])
    assert torch.equal(ef.readouts.logit_diff(5, 6)(logits, tokens), logits[:, -1, 5] - logits[:, -1, 6])
    assert ef.readouts.logit_diff(position=2).__name__ == "logit_diff[answer-counterfactual]@2"


def test_position_loss_is_the_next_token_cross_entropy_at_each_position():
    logits = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(2))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), tokens[:, 1:].reshape(-1), reduction="none").reshape(4, 4)
    torch.testing.assert_close(ef.readouts.position_loss()(logits, tokens), want)
    torch.testing.assert_close(ef.readouts.position_loss(position=-1)(logits, tokens), want[:, -1])
    targets = torch.randint(0, 7, (4, 5))
    got = ef.readouts.position_loss()(logits, (tokens, targets))  # targets of every position given
    want = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none").reshape(4, 5)
    torch.testing.assert_close(got, want)


def test_readouts_explain_what_is_wrong():
    logits = torch.randn(4, 5, 7)
    with pytest.raises(ef.ReadoutError, match="logits \\[N, T, V\\]"):
        ef.readouts.logit(1)(logits[:, 0], None)
    with pytest.raises(ef.ReadoutError, match="no column 2"):
        ef.readouts.logit_diff()(logits, (torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ef.ReadoutError, match="position=9 is out of range"):
        ef.readouts.logit(1, position=9)(logits, None)
    with pytest.raises(ef.ReadoutError, match="0..6"):
        ef.readouts.logit(8)(logits, None)
    with pytest.raises(ef.ConfigError, match="position must be an integer"):
        ef.readouts.logit(1, position=1.5)
    with pytest.raises(ef.ConfigError, match="token"):
        ef.readouts.logit(-1)


def test_a_bridge_explained_by_its_loss_at_every_position(tiny_bridge):
    model, init, tokens = tiny_bridge
    dual = ef.DualModel(model, init, readout=ef.readouts.position_loss(), order="init", dtype=F64, progress=False)
    feats = dual.features(tokens)
    assert feats.n_outputs == 4 and dual.readout.name == "position_loss"
    with torch.no_grad():
        logits = dual.call(dual.theta_trained, tokens)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(feats.z_trained, want.reshape(12, 4))
    # the factored features add up to the change the directional derivatives give, component by component
    assert feats.completeness() == pytest.approx(dual.completeness(tokens), rel=1e-8)


def test_transformer_lens_hook_names_are_accepted_as_module_names(tiny_bridge):
    model, _, tokens = tiny_bridge
    _, cache = model.run_with_cache(tokens)
    pattern = ef.baselines.neurons(model, tokens, "blocks.1.attn.hook_pattern")
    assert torch.equal(pattern.values, cache["blocks.1.attn.hook_pattern"].reshape(12, -1))
    post = ef.baselines.neurons(model, tokens, "blocks.0.mlp.hook_post", position=2)
    assert torch.equal(post.values, cache["blocks.0.mlp.hook_post"][:, 2])
    native = ef.baselines.neurons(model, tokens, "blocks.0._original_component.mlp._original_component.fc_out", "input")
    by_path = ef.baselines.neurons(model, tokens, "blocks.0.mlp.out", "input")
    assert torch.equal(native.values, by_path.values)
    assert torch.equal(native.values, cache["blocks.0.mlp.hook_post"][:, -1])
    with pytest.raises(ef.ConfigError, match="hook_pattern"):
        ef.baselines.neurons(model, tokens, "blocks.7.attn.hook_pattern")


def test_a_head_dashboard_highlights_tokens_and_draws_attention(tiny_bridge):
    model, init, tokens = tiny_bridge
    dual = ef.DualModel(model, init, readout=ef.readouts.logit(3), order="trained", dtype=F64, progress=False)
    feats = dual.features(tokens)
    dash = ef.viz.feature_dashboard(dual, "blocks.1.attn.head[2]", data=tokens, features=feats, n_examples=3)
    spans = re.findall(r"<span class='ef-tok'", dash.examples_html)
    assert len(spans) == 2 * 3 * 5  # top and bottom 3 sequences, one span per token
    per_position, shared = ef.search.position_values(feats, "blocks.1.attn.head[2]", by="contribution")
    top = ef.max_activating(feats, "blocks.1.attn.head[2]", k=3)[0]
    assert f"#{int(top.indices[0])} · {float(top.values[0]):.4g}" in dash.examples_html
    torch.testing.assert_close(
        per_position.sum(2) + shared, ef.search.feature_values(feats, "blocks.1.attn.head[2]", by="contribution")
    )
    attention = [t for t in dash.figure.data if t.type == "heatmap" and t.name == "attention pattern"]
    _, cache = model.run_with_cache(tokens[top.indices[:3]])
    assert len(attention) == 3
    for shown, want in zip(attention, cache["blocks.1.attn.hook_pattern"][:, 2]):
        np.testing.assert_allclose(shown.z, want.double().numpy(), rtol=1e-5, atol=1e-7)


def test_an_embedding_column_over_a_cyclic_vocabulary_is_a_fourier_spectrum(tiny_bridge):
    model, init, tokens = tiny_bridge
    dual = ef.DualModel(model, init, readout=ef.readouts.logit(3), order="trained", progress=False)
    dash = ef.viz.feature_dashboard(dual, "embed.weight[:,5]", data=tokens, cyclic=7)
    theta, delta = [t for t in dash.figure.data if t.type == "bar"]
    want = ef.spectra.frequency_norms(model.state_dict()["embed.weight"][:7, 5:6].detach())
    np.testing.assert_allclose(theta.y, want.numpy(), rtol=1e-6)
    assert list(theta.x) == [1, 2, 3]
