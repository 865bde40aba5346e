"""Regenerate the screenshots in docs/screenshots/ with headless Chromium.

    python scripts/make_screenshots.py            # docs/screenshots/report.png and dashboard.png

Trains the digits MLP of the zoo (seeded, about a minute on a laptop CPU), writes its report and the dashboard
of its top first-layer unit, and photographs both. Needs Chromium (``apt-get install chromium`` or
``$CHROMIUM``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import efffeat as ef
from efffeat import viz, zoo
from efffeat.ranking import rank
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
    run = zoo.digits_mlp(hidden=(32,), seed=0).train(steps=args.steps)
    print(f"digits MLP: {run.evaluate()}")
    x, y = run.data
    data = (x[: args.examples], y[: args.examples])
    dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout, order="nlo")
    feats = dual.features(data)
    table = rank(feats, by="contribution", group="neuron")
    unit = next(fid for fid in table.ids if fid.startswith("0.weight"))
    with tempfile.TemporaryDirectory() as tmp:
        report = viz.report(
            dual,
            data,
            Path(tmp) / "report.html",
            features=feats,
            table=table,
            top=3,
            title="efffeat report: digits MLP",
        )
        shot = render(report, screenshot=args.out / "report.png", size=(1280, 2000))
        dashboard = viz.feature_dashboard(dual, unit, data=data, features=feats, table=table)
        page = Path(tmp) / "dashboard.html"
        dashboard.write_html(page, include_plotlyjs=True, config={"displaylogo": False})
        size = (int(dashboard.layout.width) + 40, int(dashboard.layout.height) + 40)
        shot_dashboard = render(page, screenshot=args.out / "dashboard.png", size=size)
    for console in (shot.console, shot_dashboard.console):
        if console:
            print("the page logged:", *console, sep="\n  ", file=sys.stderr)
            return 1
    print(f"wrote {args.out / 'report.png'} and {args.out / 'dashboard.png'} (dashboard of {unit})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
