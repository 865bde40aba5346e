"""What the learned kernel ΔΘ = Θ_path − Θ_init finds that neurons, PCA and SAEs do not.

The tables of docs/validation/kernel_change.md. Five experiments, each printing Markdown tables:

- ``teacher-student``: `efffeat.compare` on the zoo teacher–student over several seeds: MMCS against the planted
  basis and against the rotated basis the product target uses, and the share of the planted plane.
- ``planted``: a planted subspace (y = z1·z2 + z3² − 1 on z = Uᵀx): the top-3 eigenvectors of ΔΘ and of the
  kernels themselves regressed on cubic polynomials of z and of a random projection.
- ``digits``: `efffeat.compare` on fresh digits MLPs under the label-free protocol, with the label-using variant
  and its control.
- ``grokking``: the p = 29 transformer of scripts/reproduce_entk_features.py (seed 1 groks): Fourier
  concentration and key frequencies of the ΔΘ eigenfeatures against the MLP neurons' key frequencies, next to the
  eigenfeatures of Θ_path, Θ_trained and Θ_init.
- ``completeness``: the dual model's residual at every order and path node count, on several models.

    python scripts/reproduce_kernel_change.py --quick                      # tiny settings (a CI test), no claims
    nice python scripts/reproduce_kernel_change.py --cache ~/.cache/efffeat   # the documented settings
    python scripts/reproduce_kernel_change.py --only grokking --cache DIR
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import efffeat as ef
import efffeat.zoo as zoo
from efffeat.baselines import metrics, neurons
from efffeat.baselines.compare import ComparisonTable, compare

MLP_OUT = "blocks.0._original_component.mlp._original_component.fc_out"


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2g}"
    return str(v)


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def seed_means(tables: list[ComparisonTable], columns: Sequence[str], per_seed: Sequence[str]) -> list[list]:
    """One row per method: the mean of each column over the tables (seeds), then each `per_seed` column per seed."""
    out = []
    for row in tables[0].rows:
        name = row["method"]
        if "units" not in row:
            out.append([name, row.get("note")] + [None] * (len(columns) + len(per_seed) - 1))
            continue
        cells: list = [name]
        for col in columns:
            values = [t[name].get(col) for t in tables]
            cells.append(None if any(v is None for v in values) else sum(values) / len(values))
        for col in per_seed:
            cells.append(" / ".join(fmt(t[name].get(col)) for t in tables))
        out.append(cells)
    return out


def completeness_note(tables: list[ComparisonTable]) -> str:
    values = [t.meta["completeness"] for t in tables if "completeness" in t.meta]
    order = tables[0].meta["order"]
    nodes = tables[0].meta.get("nodes")
    where = f"{order}, {nodes} nodes" if nodes else order
    return f"effective features at order {where}: completeness residual {min(values):.3g}–{max(values):.3g}"


# ---- 1. teacher–student -----------------------------------------------------------------------------------
TS_METHODS = (
    "effective",
    "weight-change",
    "kernel-change",
    "kernel-subspace",
    "eigen",
    "neurons",
    "pca",
    "ica",
    "sae",
    "agop",
)
EFFECTIVE = ("effective", "weight-change", "kernel-change", "kernel-subspace", "eigen")


def exp_teacher_student(quick: bool, seeds: Sequence[int], **_) -> None:
    settings = {"hidden": 32, "n_train": 512, "steps": 300} if quick else {"steps": 2000}
    tables, fits = [], []
    for seed in seeds:
        run = zoo.teacher_student(seed=seed, **settings).train(progress=False)
        fits.append(run.evaluate()["test_r2"])
        options = {"sae": {"steps": 300 if quick else 2000}}
        tables.append(compare(run, methods=TS_METHODS, seed=seed, method_options=options))
    print(
        f"\n## teacher–student y = z1·z2 (d = 20, k = 2), seeds {list(seeds)}\n\ntest R² "
        f"{' / '.join(f'{r:.3f}' for r in fits)}; {completeness_note(tables)}\n"
    )
    cols = ("mmcs", "mmcs_rotated", "share", "recall", "in_span")
    rows = seed_means(tables, cols, ("mmcs", "share"))
    print(markdown(["method", *cols, "MMCS per seed", "share per seed"], rows))
    best = max(EFFECTIVE, key=lambda m: sum(t[m]["mmcs"] for t in tables))
    mean = {m: sum(t[m]["mmcs"] for t in tables) / len(tables) for m in (best, "pca", "ica")}
    share = max(sum(t[m]["share"] for t in tables) / len(tables) for m in EFFECTIVE)
    wins = sum(t[best]["mmcs"] >= t["pca"]["mmcs"] for t in tables)
    print(
        f"\nbest effective extraction by MMCS: {best} {mean[best]:.3f} (PCA {mean['pca']:.3f}, ICA {mean['ica']:.3f}; "
        f"≥ PCA on {wins} of {len(tables)} seeds); best effective share of the plane {share:.3f}"
    )


# ---- 2. planted subspace ----------------------------------------------------------------------------------
def planted_run(seed: int, act: str, d: int, n: int, hidden: int, steps: int) -> tuple:
    """x ~ N(0, I_d), z = Uᵀx, y = z1·z2 + z3² − 1; MLP d-hidden-1 trained by full-batch Adam (lr 3e-3) on MSE."""
    g = torch.Generator().manual_seed(1000 + seed)
    U, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    x = torch.randn(n + 1024, d, generator=g)
    z = x @ U
    y = (z[:, 0] * z[:, 1] + z[:, 2] ** 2 - 1)[:, None]
    V, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh() if act == "tanh" else nn.ReLU(), nn.Linear(hidden, 1))
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        (model(x[:n]) - y[:n]).square().mean().backward()
        opt.step()
    with torch.no_grad():
        test_r2 = float(1 - (model(x[n:]) - y[n:]).square().mean() / y[n:].var())
    return model, init, x[:n], U, V, test_r2


PLANTED_VIEWS: dict[str, Callable] = {
    "ΔΘ = Θ_path − Θ_init, centred": lambda dual, x: ef.kernel_change(dual, x, k=3),
    "ΔΘ, uncentred": lambda dual, x: ef.kernel_change(dual, x, k=3, center=False),
    "ΔΘ of W₁ alone (layer kernel)": lambda dual, x: ef.kernel_change(dual, x, k=3, layer="0.weight"),
    "Θ_path (the kernel itself), centred": lambda dual, x: ef.kernel_change(dual, x, k=3, against=None),
    "Θ_init, centred": lambda dual, x: ef.kernel_change(dual, x, order="init", k=3, against=None),
}


def planted_table(act: str, seeds: Sequence[int], d: int, n: int, hidden: int, steps: int) -> None:
    """R² of the top-3 eigenvectors of each view on cubic(z) and on a random projection, the share of span U in
    the views' W₁ subspace, and (a diagnostic) in the top-3 right singular vectors of ΔW₁."""
    scores: dict[str, list] = {name: [] for name in PLANTED_VIEWS}
    fits, residuals, weight_share = [], [], []
    for seed in seeds:
        model, init, x, U, V, test_r2 = planted_run(seed, act, d, n, hidden, steps)
        dual = ef.DualModel(model, init, readout=0, order="path", nodes=4, dtype=torch.float64, progress=False)
        fits.append(test_r2)
        weight_share.append(metrics.subspace_share(ef.weight_change(dual, k=3)["0.weight"].right, U.T))
        z, zr = (x @ U).double(), (x @ V).double()
        for name, view in PLANTED_VIEWS.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*completeness residual.*")  # Θ_init: reported below
                kc = view(dual, x)
            r2z = [metrics.polynomial_r2(kc.functions[:, i], z, 3) for i in range(3)]
            r2r = [metrics.polynomial_r2(kc.functions[:, i], zr, 3) for i in range(3)]
            share = metrics.subspace_share(kc.subspace("0.weight", 3), U.T)
            scores[name].append((sum(r2z) / 3, sum(r2r) / 3, share))
            if name.startswith("ΔΘ = "):
                residuals.append(kc.meta["completeness"]["order"])
    print(
        f"### {act}, MLP {d}-{hidden}-1: test R² {' / '.join(f'{r:.2f}' for r in fits)}; path completeness residual "
        f"{min(residuals):.2g}–{max(residuals):.2g} (Θ_init's order, init: see the completeness section); share of "
        f"span U in the top-3 singular vectors of ΔW₁ {' / '.join(f'{w:.2f}' for w in weight_share)}\n"
    )
    rows = []
    for name, per in scores.items():
        mean = [sum(p[i] for p in per) / len(per) for i in range(3)]
        rows.append([name, mean[0], " / ".join(f"{p[0]:.2f}" for p in per), mean[1], mean[2]])
    header = ["view (top-3 eigenvectors)", "R² on cubic(z)", "per seed", "R² on a random projection", "share of span U"]
    print(markdown(header, rows) + "\n")


def exp_planted(quick: bool, seeds: Sequence[int], **_) -> None:
    d, n, hidden, steps = (20, 512, 64, 400) if quick else (30, 2048, 128, 2000)
    print(f"\n## planted subspace (d = {d}, N = {n}, {steps} steps), seeds {list(seeds)}\n")
    for act in ("relu",) if quick else ("tanh", "relu"):
        planted_table(act, seeds, d, n, hidden, steps)
    if not quick:  # where ΔΘ misleads: a narrow tanh network that fits by saturating units along random directions
        planted_table("tanh", seeds[:2], d, n, 32, steps)


# ---- 3. digits --------------------------------------------------------------------------------------------
DIGIT_METHODS = (
    "effective",
    "kernel-change",
    "eigen",
    "neurons",
    "pca",
    "ica",
    "sae",
    "nmf",
    "effective-label",
    "label-control",
)


def exp_digits(quick: bool, seeds: Sequence[int], **_) -> None:
    widths = [(16,)] if quick else [(48,), (32,)]
    for hidden in widths:
        tables, accuracy = [], []
        for seed in seeds:
            run = zoo.digits_mlp(hidden=hidden, steps=300 if quick else 2000, seed=seed).train(progress=False)
            accuracy.append(run.evaluate()["test_accuracy"])
            methods = ("effective", "kernel-change", "neurons") if quick else DIGIT_METHODS
            tables.append(compare(run, methods=methods, seed=seed, method_options=None))
        print(
            f"\n## digits MLP 64-{hidden[0]}-10, label-free, seeds {list(seeds)}\n\ntest accuracy "
            f"{' / '.join(f'{a:.3f}' for a in accuracy)}; {completeness_note(tables)}\n"
        )
        cols = ("purity@20", "purity@20 ±", "selectivity")
        rows = seed_means(tables, cols, ("purity@20", "purity@20 ±"))
        print(markdown(["method", *cols, "purity@20 per seed", "± per seed"], rows))
        base = sum(t["neurons"]["purity@20"] for t in tables) / len(tables)
        for col in cols[:2]:
            best = max(("effective", "kernel-change"), key=lambda m: sum(t[m][col] for t in tables))
            value = sum(t[best][col] for t in tables) / len(tables)
            print(
                f"\nbest label-free effective view by {col}: {best} {value:.3f} "
                f"(neurons {base:.3f}, {value - base:+.3f})"
            )


# ---- 4. grokking ------------------------------------------------------------------------------------------
def _entk_script():
    path = Path(__file__).resolve().parent / "reproduce_entk_features.py"
    spec = importlib.util.spec_from_file_location("reproduce_entk_features", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fourier_row(name: str, functions: Tensor, values: Tensor, a: Tensor, b: Tensor, p: int, keys: list[int]) -> list:
    """Median concentration in 6 frequencies, the top-|keys| frequencies and their Jaccard with the keys, median
    power on the keys, for functions ``[p², n]``."""
    power = metrics.frequency_power(functions, a, b, p)
    conc = metrics.fourier_concentration(functions, a, b, p)
    found = sorted(int(i) + 1 for i in power.sum(dim=0).topk(len(keys)).indices)
    key_power = power[:, [k - 1 for k in keys]].sum(dim=1)
    shown = ", ".join(f"{float(v):.3g}" for v in values[:4]) if values is not None else "–"
    return [
        name,
        float(conc.median()),
        float(conc.min()),
        found,
        metrics.jaccard(found, keys),
        float(key_power.median()),
        shown,
    ]


def exp_grokking(quick: bool, cache: str | None, grok_seeds: Sequence[int], classes: Sequence[int], **_) -> None:
    entk = _entk_script()
    k = 4 if quick else 10
    for seed in grok_seeds:
        s = entk.QUICK_TRANSFORMER if quick else entk.TransformerSettings(seed=seed, epochs=2000)
        start = time.perf_counter()
        model, init, tokens, a, b, log = entk.cached_transformer(s, cache, progress=False)
        model.eval()
        p = s.p
        acts = neurons(model, tokens, MLP_OUT, "input").values.double()
        keys = metrics.key_frequencies_of(acts, a, b, p)
        live = acts.var(dim=0) > 1e-8 * float(acts.var(dim=0).max())
        print(
            f"\n## grokking: p = {p} transformer, seed {s.seed}, {s.epochs} epochs (test accuracy {log[-1][1]:.1f} % "
            f"at the end; {time.perf_counter() - start:.0f} s to train or load)\n\nneuron key frequencies {keys}; "
            f"top-{k} eigenfeatures per view\n"
        )
        rows = [fourier_row(f"MLP neurons ({int(live.sum())} live)", acts[:, live], None, a, b, p, keys)]
        for c in classes:
            dual = ef.DualModel(model, init, readout=c, order="path", nodes=4, progress=False)
            fa, fb = dual.features(tokens, 512), dual.features(tokens, 512, order="init")
            ft = dual.features(tokens, 512, order="trained")
            views = {
                "ΔΘ = Θ_path − Θ_init, centred": ef.kernel_change(fa, against=fb, k=k),
                "ΔΘ, uncentred": ef.kernel_change(fa, against=fb, k=k, center=False),
                "ΔΘ of W_U alone": ef.kernel_change(fa, against=fb, k=k, layer="unembed.weight"),
                "Θ_path (the kernel itself), centred": ef.kernel_change(fa, against=None, k=k),
            }
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*completeness residual.*")  # one-point orders: shown below
                views["Θ_trained (eNTK), centred"] = ef.kernel_change(ft, against=None, k=k)
                views["Θ_init, centred"] = ef.kernel_change(fb, against=None, k=k)
            for name, kc in views.items():
                rows.append(fourier_row(f"logit {c}: {name}", kc.functions, kc.values, a, b, p, keys))
            residual = ", ".join(f"{f.order} {f.completeness():.2g}" for f in (fa, ft, fb))
            rows.append([f"logit {c}: completeness residual ({residual})"] + [None] * 6)
        print(
            markdown(
                [
                    "view",
                    "concentration in 6 freqs (median)",
                    "(min)",
                    "top freqs",
                    "Jaccard vs neurons",
                    "power on the neuron keys (median)",
                    "|λ| or λ, first 4",
                ],
                rows,
            )
        )
        g = torch.randn(p * p, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        chance = float(metrics.fourier_concentration(g, a, b, p).median())
        print(f"\nchance (iid Gaussian functions): concentration {chance:.3f}")


# ---- 5. completeness of every order -----------------------------------------------------------------------
class NTKMLP(nn.Module):
    """``f(x) = W₂ σ(W₁ x / √d) / √h`` with N(0, 1) weights (NTK parameterisation)."""

    def __init__(self, d: int, h: int, act: str):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h, bias=False), nn.Linear(h, 1, bias=False)
        nn.init.normal_(self.l1.weight)
        nn.init.normal_(self.l2.weight)
        self.d, self.h, self.act = d, h, act

    def forward(self, x: Tensor) -> Tensor:
        a = self.l1(x) / math.sqrt(self.d)
        return self.l2(torch.tanh(a) if self.act == "tanh" else torch.relu(a)) / math.sqrt(self.h)


def near_init(act: str, width: int, steps: int) -> tuple:
    """An NTK-parameterised MLP 20-width-1 after `steps` SGD steps (lr 1) on z1·z2: close to its initialisation."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 2, generator=g))
    x = torch.randn(512, 20, generator=g)
    y = (x @ U).prod(dim=1, keepdim=True)
    torch.manual_seed(0)
    model = NTKMLP(20, width, act)
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return model, init, x, "output"


def completeness_models(quick: bool):
    steps = 300 if quick else 2000
    tms = zoo.tms(lr=0.01, batch_size=256, n_data=512, steps=300 if quick else 1500, seed=0).train(progress=False)
    yield "TMS (5, 2), the demo's settings", tms.model, tms.init_state, tms.data, "output"
    dg = zoo.digits_mlp(steps=steps, seed=0).train(progress=False)
    yield "digits MLP 64-32-10, all logits", dg.model, dg.init_state, dg.data, "output"
    ts = zoo.teacher_student(steps=steps, seed=1).train(progress=False)
    yield "teacher–student 20-64-1 ReLU", ts.model, ts.init_state, ts.data, ts.readout
    width = 256 if quick else 2048
    for act in ("relu", "tanh"):
        steps = 50 if quick else 200
        yield (f"near-init NTK MLP 20-{width}-1 {act}, {steps} SGD steps", *near_init(act, width, steps))
    d, n, hidden = (20, 512, 64) if quick else (30, 2048, 128)
    model, init, x, _, _, _ = planted_run(1, "tanh", d, n, hidden, 400 if quick else 2000)
    yield f"planted subspace {d}-{hidden}-1 tanh", model, init, x, 0


def exp_completeness(quick: bool, **_) -> None:
    nodes = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32)
    print("\n## completeness residual of every order (first 256 examples, float64, jvps only)\n")
    rows = []
    for name, model, init, data, readout in completeness_models(quick):
        head = tuple(t[:256] for t in data) if isinstance(data, tuple) else data[:256]
        res = {}
        for order in ("init", "nlo", "trained"):
            dual = ef.DualModel(model, init, readout=readout, order=order, dtype=torch.float64, progress=False)
            res[order] = dual.completeness(head)
        path = []
        for n in nodes:
            dual = ef.DualModel(
                model, init, readout=readout, order="path", nodes=n, dtype=torch.float64, progress=False
            )
            path.append(dual.completeness(head))
        slope = (math.log(path[-1]) - math.log(path[2])) / (math.log(nodes[-1]) - math.log(nodes[2]))
        reach = next((n for n, r in zip(nodes, path) if r <= 1e-3), None)
        needed = reach if reach is not None else nodes[-1] * (path[-1] / 1e-3) ** (-1 / slope) if slope < 0 else None
        rows.append(
            [
                name,
                res["init"],
                res["nlo"],
                res["trained"],
                " / ".join(fmt(r) for r in path),
                slope,
                f"{needed:.0f}" if needed is not None else "–",
            ]
        )
    print(
        markdown(
            [
                "model",
                "init",
                "nlo",
                "trained",
                f"path, nodes {' / '.join(map(str, nodes))}",
                f"slope log r / log n ({nodes[2]}–{nodes[-1]})",
                "nodes for ≤ 1e-3",
            ],
            rows,
        )
    )


EXPERIMENTS: dict[str, Callable] = {
    "teacher-student": exp_teacher_student,
    "planted": exp_planted,
    "digits": exp_digits,
    "grokking": exp_grokking,
    "completeness": exp_completeness,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings that exercise every path (CI)")
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append", help="run only this experiment")
    parser.add_argument("--cache", default=None, help="folder for the trained transformer (reused when present)")
    parser.add_argument("--grok-seeds", type=int, nargs="+", default=[1], help="transformer seeds (default 1)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="logits read (default 0 7)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(converge|Objective did not).*")  # scikit-learn's solvers
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in args.only or list(EXPERIMENTS):
        start = time.perf_counter()
        seeds = {"teacher-student": [1, 2, 3, 4, 5], "planted": [1, 2, 3], "digits": [1, 2, 3]}.get(name, [1])
        EXPERIMENTS[name](
            quick=args.quick,
            seeds=seeds[:1] if args.quick else seeds,
            cache=args.cache,
            grok_seeds=args.grok_seeds,
            classes=args.classes or ([0] if args.quick else [0, 7]),
        )
        print(f"\n[{name}: {time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
