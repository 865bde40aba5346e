"""Execute the notebooks at full size and store them with their outputs.

    python notebooks/execute.py                      # every notebook here
    python notebooks/execute.py 05_your_own_model.ipynb

Each plotly figure is stored as plotly JSON (interactive in Jupyter, without plotly.js repeated in every
output) and gets a PNG beside it, drawn by headless Chromium, so that the notebooks show their figures where
no JavaScript runs (on GitHub). The cells run in a temporary directory, so the reports they write do not land
here. Needs Chromium (``apt-get install chromium`` or ``$CHROMIUM``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from plotly.offline import get_plotlyjs

from efffeat._atomic import write_text_atomic
from efffeat.viz._chromium import find_chromium, render

HERE = Path(__file__).resolve().parent
PLOTLY = "application/vnd.plotly.v1+json"
_DEFAULT_SIZE = (900, 500)  # plotly's size for a figure that sets none


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found: apt-get install chromium, or set $CHROMIUM", file=sys.stderr)
        return 2
    paths = [HERE / n for n in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="efffeat-notebooks-") as tmp:
        kernel = _kernel(Path(tmp))
        for path in paths:
            start = time.perf_counter()
            nb = nbformat.read(path, as_version=4)
            env = {k: v for k, v in os.environ.items() if k != "EFFFEAT_SMALL"}
            env.update({"PLOTLY_RENDERER": "plotly_mimetype", "TQDM_DISABLE": "1", "JUPYTER_PATH": str(kernel)})
            client = NotebookClient(
                nb, kernel_name="python3", timeout=args.timeout, record_timing=False,
                resources={"metadata": {"path": tmp}},
            )
            client.execute(env=env)
            n = _add_pictures(nb, Path(tmp))
            write_text_atomic(path, nbformat.writes(nb))
            size = path.stat().st_size / 1e6
            print(f"{path.name}: {time.perf_counter() - start:.0f} s, {n} figures, {size:.2f} MB")
    return 0


def _kernel(root: Path) -> Path:
    """A ``python3`` kernel that runs this interpreter, on a kernel path of its own."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(root / "jupyter" / "kernels" / "python3")
    return root / "jupyter"


def _add_pictures(nb: nbformat.NotebookNode, tmp: Path) -> int:
    """Give every plotly output a PNG of the figure (returns how many); drop tqdm's note that the kernel has
    no ipywidgets, which says nothing about the notebook."""
    count = 0
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        cell["outputs"] = [o for o in cell["outputs"] if "IProgress not found" not in o.get("text", "")]
        for output in cell["outputs"]:
            figure = output.get("data", {}).get(PLOTLY)
            if figure is None:
                continue
            output["data"]["image/png"] = _png(figure, tmp / f"figure{count}")
            count += 1
    return count


def _png(figure: dict, stem: Path) -> str:
    """The figure drawn by Chromium at its own size, as base64 PNG."""
    layout = figure.get("layout", {})
    width, height = int(layout.get("width") or _DEFAULT_SIZE[0]), int(layout.get("height") or _DEFAULT_SIZE[1])
    page = stem.with_suffix(".html")
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>body{margin:0;background:#fff}</style>"
        f"<script>{get_plotlyjs()}</script></head><body><div id='f' style='width:{width}px;height:{height}px'></div>"
        f"<script>var fig = {json.dumps(figure)}; fig.layout.width = {width}; fig.layout.height = {height};"
        "Plotly.newPlot('f', fig.data, fig.layout, {staticPlot: true});</script></body></html>"
    )
    png = stem.with_suffix(".png")
    shot = render(page, screenshot=png, size=(width, height))
    if shot.console:
        raise RuntimeError(f"drawing a figure logged to the console: {shot.console}")
    return base64.b64encode(png.read_bytes()).decode()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
