"""Regenerate the screenshots in docs/screenshots/ with headless Chromium.

    python scripts/make_screenshots.py     # report.png, dashboard.png and tokens.png

Trains the digits MLP of the zoo (seeded, about a minute on a laptop CPU), writes its report and the dashboard
of its top first-layer unit; trains a 2-layer attention-only TransformerBridge on induction (half a minute)
and draws the dashboard of its top head, with highlighted tokens and attention patterns; photographs all
three. Needs Chromium (``apt-get install chromium`` or ``$CHROMIUM``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import efffeat as ef
from efffeat import viz, zoo
from efffeat.viz._chromium import find_chromium, render

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="directory of the PNGs")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the digits MLP")
    parser.add_argument("--examples", type=int, default=600, help="examples analysed")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found: apt-get install chromium, or set $CHROMIUM", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    consoles = []
    with tempfile.TemporaryDirectory() as tmp:
        report, dashboard = _digits(args.steps, args.examples, Path(tmp))
        consoles.append(render(report, screenshot=args.out / "report.png", size=(1280, 2400)).console)
        consoles += [_photograph(dashboard, Path(tmp) / "dashboard.html", args.out / "dashboard.png")]
        consoles += [_photograph(_induction(), Path(tmp) / "tokens.html", args.out / "tokens.png")]
    for console in consoles:
        if console:
            print("the page logged:", *console, sep="\n  ", file=sys.stderr)
            return 1
    print(f"wrote report.png, dashboard.png and tokens.png to {args.out}")
    return 0


def _photograph(dashboard: viz.dashboard.Dashboard, page: Path, png: Path) -> list[str]:
    dashboard.write_html(page)
    fig = dashboard.figure
    tokens = 40 + 34 * dashboard.examples_html.count("class='ef-seq'") if dashboard.examples_html else 0
    return render(page, screenshot=png, size=(int(fig.layout.width) + 40, int(fig.layout.height) + 40 + tokens)).console


def _digits(steps: int, examples: int, tmp: Path) -> tuple[Path, viz.dashboard.Dashboard]:
    """The digits MLP's report and the dashboard of its top first-layer unit."""
    run = zoo.digits_mlp(hidden=(32,), seed=0).train(steps=steps)
    print(f"digits MLP: {run.evaluate()}")
    x, y = run.data
    data = (x[:examples], y[:examples])
    dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout)  # order auto: path here
    an = ef.analyse(dual, data, by="contribution", group="neuron", n_change=10)
    report = viz.report(an, tmp / "report.html", top=3, title="efffeat report: digits MLP")
    unit = next(fid for fid in an.table.ids if fid.startswith("0.weight"))
    dashboard = viz.feature_dashboard(
        dual, unit, data=data, features=an.features, table=an.table, completeness=an.completeness()
    )
    return report, dashboard


def _induction(vocab: int = 16, length: int = 10, steps: int = 300) -> viz.dashboard.Dashboard:
    """The dashboard of the top head of a 2-layer attention-only bridge trained on induction: in a sequence of
    distinct tokens whose last one appeared once before, answer with the token that followed it."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=64,
        d_head=16,
        n_layers=2,
        n_heads=4,
        n_ctx=length,
        d_vocab=vocab,
        attn_only=True,
        act_fn="relu",
        normalization_type=None,
        seed=0,
    )
    model = TransformerBridge.boot_native(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(n)])
        earlier = torch.randint(0, length - 2, (n,), generator=g)
        tokens[:, -1] = tokens[torch.arange(n), earlier]
        return tokens, tokens[torch.arange(n), earlier + 1]

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, answers = sequences(256, step)
        loss = torch.nn.functional.cross_entropy(model(x)[:, -1], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    data = sequences(256, 10**6)
    dual = ef.DualModel(model, init, readout=ef.readouts.logit(position=-1), order="path", nodes=3)
    an = ef.analyse(dual, data, group="head", n_eigen=0)
    return viz.feature_dashboard(
        dual, an.table.ids[0], data=data, features=an.features, table=an.table, completeness=an.completeness()
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
