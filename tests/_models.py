"""Small models for the core tests, each with a θ0 and a θ* a random step away."""

from __future__ import annotations

import torch
from torch import nn

import efffeat as ef


def mlp(d_in: int, widths: tuple[int, ...], d_out: int, act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for w in widths:
        layers += [nn.Linear(d, w, bias=bias), act()]
        d = w
    layers.append(nn.Linear(d, d_out, bias=bias))
    return nn.Sequential(*layers)


class TiedTMS(nn.Module):
    """x' = ReLU(Wᵀ W x + b) with the decoder a TransposedLinear of the encoder (factored tied weights)."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.encoder = nn.Linear(n, m, bias=False)
        self.decoder = ef.TransposedLinear(self.encoder, bias=True)

    def forward(self, x):
        return torch.relu(self.decoder(self.encoder(x)))


class RawTMS(nn.Module):
    """x' = ReLU(Wᵀ W x + b) with W a raw parameter (no factored rule: torch.func fallback)."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(m, n) / m**0.5)
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.relu((x @ self.W.T) @ self.W + self.b)


class Scale(nn.Module):
    """A custom parameterised module: y = x ⊙ s (no factored rule)."""

    def __init__(self, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.s


class LinearTwice(nn.Module):
    """A Linear applied to the input, and its weight used again outside it (caught by the plan's probe)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.out(h @ self.lin.weight)


def bridge(n_layers: int = 1, d_vocab: int = 11, n_ctx: int = 3, normalization: str | None = "LN", seed: int = 0):
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=16,
        d_head=4,
        n_layers=n_layers,
        n_ctx=n_ctx,
        n_heads=4,
        d_vocab=d_vocab,
        d_mlp=32,
        act_fn="gelu",
        normalization_type=normalization,
        seed=seed,
    )
    return TransformerBridge.boot_native(cfg)


def perturbed(model: nn.Module, step: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Move the model's parameters by a seeded random step; return the state_dict from before (θ0)."""
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(step * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return init


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def init_params(model: nn.Module, init_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 by named_parameters name, from a state_dict."""
    by_id = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    return {n: init_state[by_id[id(p)]].to(p.dtype) for n, p in model.named_parameters()}


def trained_digits_mlp(n: int, act: type[nn.Module], steps: int, dtype: torch.dtype = torch.float32):
    """A 64-8-10 MLP trained briefly on the first `n` scikit-learn digits: (model, init state, x, y)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=dtype) / 16
    y = torch.tensor(d.target[:n])
    model = nn.Sequential(nn.Linear(64, 8), act(), nn.Linear(8, 10)).to(dtype)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, init, x, y
