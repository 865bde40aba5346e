"""A one-layer transformer that learns ``(a + b) mod p`` and groks (Power et al. 2022; Nanda et al. 2023).

Built with TransformerLens 4.x ``TransformerBridge.boot_native``: d_model 128, 4 heads, d_mlp 512, ReLU, no
LayerNorm; tokens ``"a b ="`` (the ``=`` token is p, so the vocabulary is p + 1 and the output p); cross-entropy
at the last position; AdamW lr 1e-3, weight decay 1, betas (0.9, 0.98), full batch on a 30 % train split.
The analysis data is every pair: ``run.data = (tokens [p², 3], labels [p²])``, a-major.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..baselines.base import correct_logit
from ..errors import ConfigError
from ..spectra.fourier import frequency_norms, key_frequencies
from .run import SEED, STEPS, Built, Recipe, Run, checked_config, count, rate, register, within_budget

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from ..baselines import Probe, Units

# The MLP's hidden activations are the input of this module (see `efffeat.baselines.neurons`).
MLP_OUT = "blocks.0._original_component.mlp._original_component.fc_out"


def all_pairs(p: int) -> tuple[Tensor, Tensor]:
    """``(tokens [p², 3], labels [p²])`` for every ``(a, b)``, a-major; the third token is ``=`` (id p)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    return torch.stack([a, b, torch.full_like(a, p)], dim=1), (a + b) % p


def _build(config: dict) -> Built:
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    p = config["p"]
    cfg = TransformerBridgeConfig(
        d_model=config["d_model"],
        d_head=config["d_model"] // config["n_heads"],
        n_layers=1,
        n_ctx=3,
        n_heads=config["n_heads"],
        d_vocab=p + 1,
        d_vocab_out=p,
        d_mlp=config["d_mlp"],
        act_fn="relu",
        normalization_type=None,
        seed=int(config["seed"]),
    )
    model = TransformerBridge.boot_native(cfg)
    tokens, labels = all_pairs(p)
    gen = torch.Generator().manual_seed(int(config["seed"]) + 2)
    order = torch.randperm(p * p, generator=gen)
    n_train = round(config["train_fraction"] * p * p)
    return Built(model, (tokens, labels), None, {"train_idx": order[:n_train], "test_idx": order[n_train:]})


def _optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    wd = config["weight_decay"]
    return torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=wd, betas=(0.9, 0.98))


def _split_loss(run: Run, idx: Tensor) -> tuple[Tensor, Tensor]:
    tokens, labels = run.data
    logits = run.model(tokens[idx])[:, -1]
    return F.cross_entropy(logits, labels[idx]), (logits.argmax(1) == labels[idx]).float().mean()


def _loss(run: Run, generator: torch.Generator) -> Tensor:
    return _split_loss(run, run.extra["train_idx"])[0]


def _evaluate(run: Run) -> dict[str, float]:
    out = {}
    for split in ("train", "test"):
        loss, acc = _split_loss(run, run.extra[f"{split}_idx"])
        out[f"{split}_loss"], out[f"{split}_accuracy"] = float(loss), float(acc)
    return out


def embedding(run: Run) -> Tensor:
    """``[p, d_model]``: the token embedding of the numbers 0..p-1."""
    return run.model.state_dict()["embed.weight"][: run.config["p"]].detach()


def run_key_frequencies(run: Run, n: int | None = None) -> list[int]:
    """Key frequencies of a modular-addition run, read from its embedding's DFT (`key_frequencies`)."""
    return key_frequencies(embedding(run), n)


def fourier_figure(run: Run, param: str = "embed.weight", p: int | None = None, n_key: int | None = None) -> Figure:
    """`efffeat.viz.fourier` of a modular-addition run's token embedding, trained (θ*) and learned (Δθ).

    The norms of the Fourier components (`efffeat.spectra.frequency_norms`, ``[p // 2]`` each) of the rows of
    `param` for the number tokens 0 … p − 1, for θ* and for Δθ = θ* − θ0, and the key frequencies of θ*
    (`efffeat.spectra.key_frequencies`, `n_key` of them or the count its largest drop gives). p: the modulus
    (default ``run.config["p"]``).
    """
    from ..viz import fourier

    state = run.model.state_dict()
    if param not in state or state[param].ndim != 2:
        found = ", ".join(k for k, v in state.items() if v.ndim == 2)
        raise ConfigError(
            f"the Fourier view reads a token embedding [d_vocab, d_model]: {param!r} is not one of ({found})"
        )
    p = int(p if p is not None else run.config.get("p", state[param].shape[0]))
    if not 3 <= p <= state[param].shape[0]:
        raise ConfigError(f"p={p} does not fit the embedding's {state[param].shape[0]} rows")
    trained = state[param][:p].detach()
    delta = trained - run.init_state[param][:p].detach().to(trained.dtype)
    norms = {"trained θ*": frequency_norms(trained), "learned Δθ": frequency_norms(delta)}
    return fourier(norms, key_frequencies(trained, n_key), p, param=param)


def _decode(tokens: Sequence[int]) -> str:
    """A pair's tokens as text: ``"a + b ="``."""
    return f"{tokens[0]} + {tokens[1]} ="


def _token_text(p: int) -> Callable[[int], str]:
    """One token as text: its number, or ``=`` for the token p."""
    return lambda t: "=" if t == p else str(t)


def _probe(config: dict) -> Probe:
    """The MLP's hidden units (the input of its output projection); W₁ is the MLP's input weight.

    Label-free: the effective methods read the logit of class 0 over every pair (one clean ``[p², p²]`` kernel).
    """
    from ..baselines import Probe

    return Probe(MLP_OUT, "blocks.0.mlp.in.weight", at="input", n_units=16, readout=0, scored="functions")


def neuron_key_frequencies(run: Run) -> list[int]:
    """The key frequencies of the MLP neurons over all pairs (`efffeat.metrics.key_frequencies_of`)."""
    from ..baselines import neurons
    from ..baselines.metrics import key_frequencies_of

    tokens = run.data[0]
    acts = neurons(run.model, tokens, MLP_OUT, "input").values
    return key_frequencies_of(acts, tokens[:, 0], tokens[:, 1], run.config["p"])


def _score(run: Run, units: Units) -> dict[str, Any]:
    """Fourier structure of each unit's function over all pairs, against the neurons' key frequencies.

    ``concentration``: median share of a unit's power in its 6 strongest frequencies; ``key_power``: median share
    on the neurons' key frequencies; ``jaccard``: the top frequencies of the units' summed power (as many as there
    are keys) against the keys; ``key_freqs``: the neurons' key frequencies.
    """
    from ..baselines import metrics

    tokens, p = run.data[0], run.config["p"]
    a, b = tokens[:, 0], tokens[:, 1]
    keys = neuron_key_frequencies(run)
    live = units.functions.double().var(dim=0) > 0
    power = metrics.frequency_power(units.functions[:, live], a, b, p)  # [n, p // 2]
    found = sorted(int(i) + 1 for i in power.sum(dim=0).topk(len(keys)).indices)
    return {
        "concentration": float(metrics.fourier_concentration(units.functions[:, live], a, b, p).median()),
        "key_power": float(power[:, [k - 1 for k in keys]].sum(dim=1).median()),
        "jaccard": metrics.jaccard(found, keys),
        "key_freqs": " ".join(str(k) for k in keys),
    }


_OPTIONS = {
    "p": count(3, 1 << 12),
    "d_model": count(1, 1 << 14),
    "n_heads": count(1, 1 << 10),
    "d_mlp": count(1, 1 << 16),
    "train_fraction": rate(0.0, 1.0, below=True),
    "steps": STEPS,
    "lr": rate(),
    "weight_decay": rate(strict=False),
    "seed": SEED,
}


def _check(config: dict) -> dict:
    """The config with every option checked; both splits non-empty, the weights and a full batch within budget."""
    c = checked_config("modular_addition", config, _OPTIONS)
    p, d, heads, d_mlp = c["p"], c["d_model"], c["n_heads"], c["d_mlp"]
    if d % heads:
        raise ConfigError(f"d_model ({d}) must be divisible by n_heads ({heads})")
    if not 1 <= round(c["train_fraction"] * p * p) < p * p:
        raise ConfigError(
            f"train_fraction must leave both splits of the {p * p} pairs non-empty, got {c['train_fraction']}"
        )
    weights = (2 * p + 4) * d + 4 * d * d + 2 * d * d_mlp
    activations = p * p * (3 * (4 * d + d_mlp + heads * 3) + p)  # one full-batch forward over every pair
    within_budget("modular_addition", weights + activations, "the weights and a full batch's activations")
    return c


register(
    "modular_addition",
    Recipe(
        _build,
        _optimizer,
        _loss,
        _evaluate,
        readout=correct_logit,
        probe=_probe,
        score=_score,
        figures=lambda run: {"Fourier view of the embedding": fourier_figure(run)},
        dashboard_options=lambda run: {
            "decode": _decode,
            "token_text": _token_text(run.config["p"]),
            "cyclic": run.config["p"],  # the numbers 0 … p − 1: embedding columns as Fourier spectra
        },
        check=_check,
    ),
)


def modular_addition(
    p: int = 113,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int = 512,
    train_fraction: float = 0.3,
    steps: int = 10_000,
    lr: float = 1e-3,
    weight_decay: float = 1.0,
    seed: int = 0,
) -> Run:
    """A one-layer TransformerBridge on ``(a + b) mod p`` (untrained; p = 113 groks after about 7k steps)."""
    return Run(
        {
            "kind": "modular_addition",
            "p": p,
            "d_model": d_model,
            "n_heads": n_heads,
            "d_mlp": d_mlp,
            "train_fraction": train_fraction,
            "steps": steps,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
        }
    )
