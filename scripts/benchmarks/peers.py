"""efffeat against the per-sample-gradient peers, side by side in one process: the same tensors for everyone, best
of ``--repeat``, at ``--threads`` torch threads, the load average recorded with every row.

    python scripts/bench.py peers [--threads 1] [--repeat 3] [--jobs kernel,rank,norms,bridge,minilm]
                                  [--big] [--nt PYTHON] [--json FILE]

The peers are optional (``pip install -e '.[bench]'`` and ``pip install --no-deps backpack-for-pytorch==1.7.1
unfoldNd``, see docs/BENCHMARKS.md); a job whose peer is missing says so and times efffeat alone.

Jobs (float32; the MLP is 64-512-512-512-1 tanh, P = 559,105, θ* a seeded step from θ0, readout its output,
order ``"trained"``, so that every tool computes the same per-example gradients):

  kernel  K = J Jᵀ at N = 512 and 4096. efffeat: ``dual.features(x).kernel()``. Opacus ``GradSampleModule``,
          BackPACK ``BatchGrad`` and ``torch.func`` ``vmap(grad)`` fill a preallocated J [N, P] in chunks of 512
          examples, then ``J @ J.T`` (the N = 4096 peers only with ``--big``: minutes each and a 9 GB J).
          neural-tangents ``empirical_ntk_fn`` with ``--nt PYTHON``, an interpreter with JAX (nt_kernel.py).
  rank    every parameter scored by ``√(Δθ² Σ_x g² / N)`` and sorted, N = 512 and 4096:
          ``ef.rank(dual.features(x), by="contribution")`` against BackPACK ``SumGradSquared`` + ``torch.sort``.
  norms   ‖g_x‖ of every example, N = 4096: ``ef.per_example_norms(dual, x)`` against BackPACK ``BatchL2Grad``
          and Opacus ghost clipping (``GradSampleModuleFastGradientClipping``).
  bridge  the kernel of a 1-layer mod-add TransformerBridge (d_model 128, 4 heads, d_mlp 512, p = 113), readout
          the correct answer's logit, N = 1024: efffeat against ``torch.func`` ``vmap(grad)`` (through efffeat's
          parameter swap: ``functional_call`` detaches a bridge's blocks from their parameters), a per-example
          autograd loop and Opacus (on the bridge's own module tree; its block-layer gradients come out wrong,
          which the rel. diff column shows).
  minilm  a MiniLM-L6-shaped BERT (random weights, 22.6M parameters), N = 256 sequences of 16 tokens: the
          capture (``dual.features``) against one ``ef.rank`` of every parameter; no peer.

Each kernel job adds a roofline line: the GFLOP/s of efffeat's kernel (from the stored factors, and including the
capture) on the flops it needs — per layer ``2 N² (d_in + d_out)`` per pair of rank terms ``r ≤ s``, biases
folded — against one ``torch.matmul`` of the same flops, timed in turn with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import efffeat as ef

WIDTHS = (64, 512, 512, 512, 1)
ROWS: list[dict] = []


# ---- timing and rows -----------------------------------------------------------------------------------------
def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved(fns: list[Callable[[], object]], repeat: int) -> list[tuple[float, object]]:
    """Best-of-`repeat` seconds (and last result) of several functions run in turn, so that load which changes
    during the run affects each alike."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def row(job: str, who: str, seconds: float | None, ref: float | None = None, **extra) -> None:
    """Record and print one row; `ref` is efffeat's time for the same job (the ratio is peer ÷ efffeat)."""
    r = {"job": job, "who": who, "s": seconds, "load": loadavg(), "threads": torch.get_num_threads(), **extra}
    if ref is not None and seconds is not None:
        r["ratio"] = seconds / ref
    ROWS.append(r)
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"  {job:14s} {who:44s} {'—' if seconds is None else f'{seconds:.4g} s':>10}  {shown}", flush=True)


def missing(job: str, who: str, error: Exception) -> None:
    row(job, f"{who}: not installed ({type(error).__name__})", None)


# ---- the MLP -------------------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """64-512-512-512-1 tanh; θ* = θ0 + 0.01·noise (the timings do not depend on training)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), init


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, WIDTHS[0], generator=torch.Generator().manual_seed(1))


def dual_of(model: nn.Module, init: dict, readout=0) -> ef.DualModel:
    dual = ef.DualModel(model, init, readout=readout, order="trained", progress=False)
    return dual


def needed_flops(feats: ef.EffectiveFeatures) -> float:
    """2 × the multiply-adds of the kernel's GEMMs: per factor ``2 N² (d0 + d1)`` per pair of rank terms ``r ≤ s``
    (``2 N² d`` for an embedding, whose other side is a comparison of token ids; ``2 N² numel`` for a dense
    factor), with the biases that the kernel folds into their weights (`efffeat.factors.gram_sum`) free."""
    from efffeat.factors import EmbeddingFactor, LowRankFactor, _fold_biases

    n = feats.n_examples
    names = [s.name for s in feats.slots]
    stored = [feats.factors[name] for name in names]
    kept = {id(f) for f in _fold_biases(stored, stored, feats._bias_positions(names))[0]}
    total = 0.0
    for f in stored:
        if isinstance(f, LowRankFactor | EmbeddingFactor):
            width = f.shape[1] + (f.shape[0] if isinstance(f, LowRankFactor) else 0)
            total += 2 * n * n * width * f.rank * (f.rank + 1) / 2
        elif id(f) in kept:  # not a bias folded into its weight
            total += 2 * n * n * f.numel
    return total


def roofline(job: str, feats: ef.EffectiveFeatures, t_total: float, capture_flops: float, repeat: int) -> None:
    """The kernel's achieved GFLOP/s against a same-flops matmul timed in turn with it."""
    n = feats.n_examples
    flops = needed_flops(feats)
    width = max(1, round(flops / (2 * n * n)))
    a, b = torch.randn(n, width), torch.randn(width, n)
    (t_kernel, _), (t_mm, _) = interleaved([feats.kernel, lambda: a @ b], repeat)
    matmul = 2 * n * n * width / t_mm / 1e9
    achieved = flops / t_kernel / 1e9
    row(job, "roofline: kernel from the stored factors", t_kernel, None, needed_gflop=flops / 1e9,
        gflops=achieved, matmul_gflops=matmul, fraction=achieved / matmul,
        fraction_with_capture=(flops + capture_flops) / t_total / 1e9 / matmul)


# ---- the peers' per-example gradients, into a preallocated J ---------------------------------------------------
def fill_j(per_chunk: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, p: int, chunk: int = 512):
    j = torch.empty(x.shape[0], p)
    for s in range(0, x.shape[0], chunk):
        j[s : s + chunk] = per_chunk(x[s : s + chunk])
    return j


def opacus_rows(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from opacus import GradSampleModule

    gsm = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum", batch_first=True)
    params = [p for p in gsm.parameters() if p.requires_grad]

    def per_chunk(xb: torch.Tensor) -> torch.Tensor:
        gsm.zero_grad(set_to_none=True)
        gsm(xb).sum().backward()
        out = torch.cat([p.grad_sample.reshape(len(xb), -1) for p in params], 1)
        for p in params:
            p.grad_sample = None
        return out

    return per_chunk


def backpack_rows(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    m = extend(copy.deepcopy(model))

    def per_chunk(xb: torch.Tensor) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            m(xb).sum().backward()
        return torch.cat([p.grad_batch.reshape(len(xb), -1) for p in m.parameters()], 1)

    return per_chunk


def func_rows(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0, 0]

    g = vmap(grad(f), in_dims=(None, 0))

    def per_chunk(xb: torch.Tensor) -> torch.Tensor:
        j = g(params, xb)
        return torch.cat([j[k].reshape(len(xb), -1) for k in params], 1)

    return per_chunk


# ---- jobs ------------------------------------------------------------------------------------------------------
def kernel_job(n: int, repeat: int, big: bool, nt: str | None) -> None:
    model, init = mlp()
    x = inputs(n)
    dual = dual_of(model, init)
    dual.features(x[:8])  # the plan, outside the timings
    job = f"kernel N={n}"
    p = sum(q.numel() for q in model.parameters())
    (t_ef, k_ef), = interleaved([lambda: dual.features(x, batch_size=n).kernel()], repeat)
    row(job, "efffeat features + kernel", t_ef, t_ef)
    roofline(job, dual.features(x, batch_size=n), t_ef, 4 * n * p, repeat)
    peers = [("Opacus GradSampleModule", opacus_rows), ("BackPACK BatchGrad", backpack_rows)]
    if n <= 512:
        peers.append(("torch.func vmap(grad)", func_rows))
    for who, make in peers:
        if n > 512 and not big:
            row(job, f"{who}: with --big", None)
            continue
        try:
            per_chunk = make(model)
        except ImportError as e:
            missing(job, who, e)
            continue
        reps = repeat if n <= 512 else 1

        def run(per_chunk=per_chunk):
            j = fill_j(per_chunk, x, p)
            return j @ j.T

        (t, k), = interleaved([run], reps)
        row(job, who, t, t_ef, rel_diff=rel(k, k_ef), repeats=reps)
        del k
    if nt is not None and n <= 512:
        nt_rows(job, nt, model, x, k_ef, t_ef, repeat)


def nt_rows(job: str, python: str, model: nn.Module, x: torch.Tensor, k_ref, t_ref: float, repeat: int) -> None:
    """neural-tangents in its own interpreter (nt_kernel.py), on the same inputs and parameters."""
    import numpy as np

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        arrays = {"x": x.numpy()}
        for i, m in enumerate(linear):
            arrays[f"W{i}"], arrays[f"b{i}"] = m.weight.detach().numpy(), m.bias.detach().numpy()
        np.savez(src, **arrays)
        env = dict(os.environ)
        cmd = [python, str(Path(__file__).with_name("nt_kernel.py")), str(src), str(dst), str(repeat)]
        if torch.get_num_threads() == 1:  # one XLA thread on one core
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
            cmd = ["taskset", "-c", "0", *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            row(job, "neural-tangents failed", None, error=proc.stderr.strip().splitlines()[-1][:200])
            return
        out = np.load(dst)
        for name in ("structured_derivatives", "jacobian_contraction", "ntk_vector_products"):
            first, best = out[f"t_{name}"].tolist()
            row(job, f"neural-tangents {name}", best, t_ref, first_call_s=first,
                rel_diff=rel(torch.from_numpy(out[name]), k_ref))


def rank_job(n: int, repeat: int) -> None:
    model, init = mlp()
    x = inputs(n)
    dual = dual_of(model, init)
    dual.features(x[:8])
    job = f"rank N={n}"
    delta = torch.cat([dual.delta[k].reshape(-1) for k, _ in model.named_parameters()])
    fns = [lambda: ef.rank(dual.features(x, batch_size=n, need="features"), by="contribution")]
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        bp = extend(copy.deepcopy(model))

        def backpack_rank():
            bp.zero_grad(set_to_none=True)
            with backpack(SumGradSquared()):
                bp(x).sum().backward()
            sgs = torch.cat([q.sum_grad_squared.reshape(-1) for q in bp.parameters()])
            return torch.sort((delta.square() * sgs / n).sqrt(), descending=True)

        fns.append(backpack_rank)
    except ImportError as e:
        missing(job, "BackPACK", e)
    timed = interleaved(fns, repeat)
    t_ef, table = timed[0]
    row(job, "efffeat features + ef.rank", t_ef, t_ef)
    if len(timed) > 1:
        t_bp, (values, _) = timed[1]
        row(job, "BackPACK SumGradSquared + torch.sort", t_bp, t_ef, rel_diff=rel(values, table.scores))


def norms_job(n: int, repeat: int) -> None:
    model, init = mlp()
    x = inputs(n)
    dual = dual_of(model, init)
    dual.features(x[:8])
    job = f"norms N={n}"
    fns, names = [lambda: ef.per_example_norms(dual, x, batch_size=n)], []
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        bp = extend(copy.deepcopy(model))

        def backpack_norms():
            bp.zero_grad(set_to_none=True)
            with backpack(BatchL2Grad()):
                bp(x).sum().backward()
            return sum(q.batch_l2 for q in bp.parameters()).sqrt()

        fns.append(backpack_norms)
        names.append("BackPACK BatchL2Grad")
    except ImportError as e:
        missing(job, "BackPACK", e)
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            copy.deepcopy(model).train(), loss_reduction="sum", use_ghost_clipping=True, max_grad_norm=1.0
        )

        def opacus_norms():
            gsm.zero_grad(set_to_none=True)
            gsm(x).sum().backward()
            return gsm.get_norm_sample()

        fns.append(opacus_norms)
        names.append("Opacus ghost clipping")
    except ImportError as e:
        missing(job, "Opacus", e)
    timed = interleaved(fns, repeat)
    t_ef, ref = timed[0]
    row(job, "efffeat ef.per_example_norms", t_ef, t_ef)
    for who, (t, v) in zip(names, timed[1:]):
        row(job, who, t, t_ef, rel_diff=rel(v, ref))


def bridge_model():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    p = 113
    cfg = TransformerBridgeConfig(
        d_model=128, d_head=32, n_layers=1, n_ctx=3, n_heads=4, d_vocab=p + 1, d_mlp=512, act_fn="relu",
        normalization_type=None, seed=0,
    )
    model = TransformerBridge.boot_native(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    return model, init, p


def correct_logit(out: torch.Tensor, batch) -> torch.Tensor:
    return out[:, -1].gather(1, batch[1][:, None])[:, 0]


def bridge_job(n: int, repeat: int) -> None:
    from torch.func import grad, vmap

    from efffeat._swap import ParameterSwap

    model, init, p = bridge_model()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, p, (n,), generator=g), torch.randint(0, p, (n,), generator=g)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    dual = ef.DualModel(model, init, readout=correct_logit, order="trained", progress=False)
    dual.features((x[:8], y[:8]))
    job = f"bridge N={n}"
    (t_ef, k_ef), = interleaved([lambda: dual.features((x, y), batch_size=256).kernel()], repeat)
    row(job, "efffeat features + kernel", t_ef, t_ef)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(v.numel() for v in params.values())
    roofline(job, dual.features((x, y), batch_size=256), t_ef, 4 * n * n_params, repeat)

    swap = ParameterSwap(model)  # torch.func.functional_call leaves a bridge's blocks without their parameters

    def func_kernel():
        def f(pp, xi, yi):  # out[0, -1, yi] would be data-dependent indexing under vmap
            return swap.call(pp, xi[None])[0, -1].gather(0, yi[None])[0]

        per = vmap(grad(f), in_dims=(None, 0, 0))
        j = torch.empty(n, n_params)
        for s in range(0, n, 256):
            rows = per(params, x[s : s + 256], y[s : s + 256])
            j[s : s + 256] = torch.cat([rows[k].reshape(len(rows[k]), -1) for k in params], 1)
        return j @ j.T

    def opacus_kernel():
        from opacus import GradSampleModule

        native = model.original_model  # the bridge's own module tree: same parameters, same output
        gsm = GradSampleModule(native.train(), loss_reduction="sum", batch_first=True, strict=False)
        try:
            ps = [q for q in native.parameters() if q.requires_grad]
            j = torch.empty(n, n_params)
            for s in range(0, n, 256):
                gsm.zero_grad(set_to_none=True)
                correct_logit(gsm(x[s : s + 256]), (x[s : s + 256], y[s : s + 256])).sum().backward()
                j[s : s + 256] = torch.cat([q.grad_sample.reshape(len(q.grad_sample), -1) for q in ps], 1)
                for q in ps:
                    q.grad_sample = None
            return j @ j.T
        finally:
            gsm._close()
            native.eval()

    def loop_kernel():
        ps = list(model.parameters())
        j = torch.empty(n, n_params)
        for i in range(n):
            r = correct_logit(model(x[i : i + 1]), (x[i : i + 1], y[i : i + 1]))[0]
            j[i] = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(r, ps)])
        return j @ j.T

    # Opacus last: it leaves hooks and train mode behind in the module tree it wraps
    for who, fn in [("torch.func vmap(grad)", func_kernel), ("per-example autograd loop", loop_kernel),
                    ("Opacus GradSampleModule", opacus_kernel)]:
        try:
            (t, k), = interleaved([fn], 1)
        except ImportError as e:
            missing(job, who, e)
            continue
        row(job, who, t, t_ef, rel_diff=rel(k, k_ef), repeats=1)


def minilm(n: int) -> tuple[ef.DualModel, torch.Tensor]:
    """A MiniLM-L6-shaped BERT (random weights, θ* a seeded step from θ0), readout the first hidden unit of the
    first position, order ``"trained"``, and `n` sequences of 16 random tokens; the plan made."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    tokens = torch.randint(0, cfg.vocab_size, (n, 16), generator=torch.Generator().manual_seed(1))

    def first_hidden(out, batch):
        return out.last_hidden_state[:, 0, 0]

    dual = ef.DualModel(model, init, readout=first_hidden, order="trained", progress=False)
    dual.features(tokens[:4])
    return dual, tokens


def minilm_times(
    n: int, repeat: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float, int, ef.EffectiveFeatures]:
    """Best-of-`repeat` seconds of the lean capture (``dual.features(tokens, need="features")``) and of one
    ``ef.rank`` of every parameter of its result, in turn; P, and the features."""
    dual, tokens = minilm(n)
    feats = None
    t_cap = t_rank = float("inf")
    for _ in range(repeat):
        start = clock()
        feats = dual.features(tokens, batch_size=64, need="features")
        t_cap = min(t_cap, clock() - start)
        start = clock()
        ef.rank(feats, by="contribution")
        t_rank = min(t_rank, clock() - start)
    assert feats is not None
    return t_cap, t_rank, feats.n_features, feats


def minilm_job(n: int, repeat: int) -> None:
    t_cap, t_rank, p, _ = minilm_times(n, repeat)
    job = f"MiniLM-L6 N={n}"
    row(job, "efffeat features (capture, need='features')", t_cap, t_cap, P=p)
    row(job, "efffeat ef.rank, every parameter", t_rank, t_cap)


def table(rows: list[dict]) -> str:
    """The rows as the markdown table recorded in docs/BENCHMARKS.md."""
    lines = ["| job | who | time (s) | ÷ efffeat | rel. diff | load (1/5/15 min) |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        s = "—" if r["s"] is None else f"{r['s']:.3g}"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r and not r["who"].startswith("efffeat") else ""
        diff = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        who = r["who"]
        if "fraction" in r:
            who += (
                f": {r['gflops']:.0f} GFLOP/s of {r['needed_gflop']:.3g} GFLOP needed, matmul "
                f"{r['matmul_gflops']:.0f} GFLOP/s: **{100 * r['fraction']:.0f} %** "
                f"({100 * r['fraction_with_capture']:.0f} % with the capture)"
            )
        lines.append(f"| {r['job']} | {who} | {s} | {ratio} | {diff} | {r['load']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py peers", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--jobs", default="kernel,rank,norms,bridge,minilm")
    parser.add_argument("--big", action="store_true", help="the N = 4096 kernel of Opacus and BackPACK too (minutes)")
    parser.add_argument("--nt", metavar="PYTHON", help="an interpreter with JAX and neural-tangents (nt_kernel.py)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    jobs = args.jobs.split(",")
    unknown = set(jobs) - {"kernel", "rank", "norms", "bridge", "minilm"}
    if unknown:
        parser.error(f"unknown jobs {sorted(unknown)}")
    print(f"### peers: {args.threads} torch thread(s), best of {args.repeat}, load at start {loadavg()}\n", flush=True)
    if "kernel" in jobs:
        kernel_job(512, args.repeat, args.big, args.nt)
        kernel_job(4096, args.repeat, args.big, None)
    if "rank" in jobs:
        rank_job(512, args.repeat)
        rank_job(4096, args.repeat)
    if "norms" in jobs:
        norms_job(4096, args.repeat)
    if "bridge" in jobs:
        bridge_job(1024, args.repeat)
    if "minilm" in jobs:
        minilm_job(256, args.repeat)
    print()
    print(table(ROWS))
    print(
        "\n÷ efffeat = the row's time / efffeat's time for the same job, in this run; rel. diff = ‖peer − efffeat‖ / "
        "‖efffeat‖ of the kernel, scores or norms; the load average was read as each row finished."
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
