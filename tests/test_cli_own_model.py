"""`efffeat analyse --model ... --init ... --trained ... --data ...`: one's own checkpoint, the same table as the
Python API, and every bad file a one-line error with exit code 2."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import efffeat as ef
from efffeat import cli

FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def not_a_module():
    return 3


def broken():
    raise RuntimeError("no GPU here")
"""


class Evil:
    """Unpickling this would run code: efffeat must refuse the file, never call it."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('!')",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A factory file, its weights at init (.pt) and trained (.safetensors), and data in several forms."""
    d = tmp_path_factory.mktemp("own")
    (d / "mymodel.py").write_text(FACTORY)
    namespace: dict = {}
    exec(FACTORY, namespace)
    model = namespace["build"]()
    torch.save(model.state_dict(), d / "init.pt")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "trained.safetensors"))
    x = torch.randn(30, 3, generator=g)
    torch.save(x, d / "data.pt")
    torch.save((x, torch.zeros(30)), d / "tuple.pt")
    torch.save([x, x], d / "list.pt")
    torch.save({"a": Evil()}, d / "evil.pt")
    torch.save({"0.weight": torch.zeros(6, 3)}, d / "partial.pt")
    torch.save({**model.state_dict(), "2.weight": torch.zeros(2, 7)}, d / "reshaped.pt")
    (d / "junk.pt").write_bytes(b"not a checkpoint" * 8)
    (d / "junk.safetensors").write_bytes(b"not a checkpoint" * 8)
    return d


def own(d, *extra, model="mymodel.py:build", init="init.pt", trained="trained.safetensors", data="data.pt"):
    argv = ["analyse", str(d / "out"), "--model", str(d / model) if ".py" in model else model]
    for flag, name in (("--init", init), ("--trained", trained), ("--data", data)):
        if name is not None:
            argv += [flag, str(d / name)]
    return [*argv, *extra]


def test_own_model_gives_the_python_api_table(checkpoint, capsys):
    d = checkpoint
    report = d / "out" / "report.html"
    code = cli.main(own(d, "--top", "5", "--report", str(report), "--dashboards", "1"))
    out, err = capsys.readouterr()
    assert code == 0, err
    namespace: dict = {}
    exec(FACTORY, namespace)
    model = namespace["build"]()
    model.load_state_dict(load_file(str(d / "trained.safetensors")))
    an = ef.Analysis(ef.DualModel(model.eval(), init=torch.load(d / "init.pt")), torch.load(d / "data.pt"))
    want = an.table.to_records()[:5]
    rows = re.findall(r"^ +(\d+)\. (\S+) +(\S+)$", out, re.M)
    assert [(int(r), i) for r, i, _ in rows] == [(w["rank"], w["id"]) for w in want]
    assert [float(s) for *_, s in rows] == pytest.approx([w["score"] for w in want], rel=1e-3)
    for order, value in an.completeness_by_order().items():
        assert re.search(rf"^  {order} +{value:.4g}\b", out, re.M), (order, value, out)
    analysis = json.loads((d / "out" / cli.ANALYSIS_FILE).read_text())
    assert analysis["ranking"] == json.loads(json.dumps(want))
    assert analysis["order"] == an.order and f"order {an.order}" in out and an.order_reason in out
    assert analysis["model"]["data"] == str(d / "data.pt") and analysis["model"]["init_kind"] == "initialisation"
    assert "plotly-graph-div" in report.read_text()
    assert "kernel change ΔΘ = Θ_" in out and len(re.findall(r"^ +\d+\. λ ", out, re.M)) == 10


def test_search_and_report_reuse_the_own_model_that_analyse_named(checkpoint, capsys, monkeypatch):
    d = checkpoint
    assert cli.main(own(d, "--top", "2", "--init-kind", "pretrained", "--change", "0")) == 0
    out, _ = capsys.readouterr()
    assert "note: θ0 is a pretrained network" in out and "kernel change" not in out
    monkeypatch.chdir(d.parent)  # the files are found from anywhere
    feature = "0.weight[1,:]"
    assert cli.main(["search", str(d / "out"), "--feature", feature, "-k", "4", "--by", "norm"]) == 0
    out, err = capsys.readouterr()
    namespace: dict = {}
    exec(FACTORY, namespace)
    model = namespace["build"]()
    model.load_state_dict(load_file(str(d / "trained.safetensors")))
    settings = json.loads((d / "out" / cli.ANALYSIS_FILE).read_text())
    dual = ef.DualModel(model.eval(), init=torch.load(d / "init.pt"), order=settings["order"], nodes=settings["nodes"])
    want = ef.max_activating(dual, torch.load(d / "data.pt"), [feature], k=4, by="norm", progress=False)[feature]
    rows = re.findall(r"^ +\d+\. example (\d+) +value (\S+)", out, re.M)
    assert [int(i) for i, _ in rows] == want.indices.tolist(), err
    assert cli.main(["report", str(d / "out"), "--dashboards", "0", "--change", "2"]) == 0
    page = (d / "out" / cli.REPORT_FILE).read_text()
    assert "θ0 is a pretrained network" in page and "What training changed" in page
    assert cli.main(["compare", str(d / "out")]) == 2
    assert "for your own model call ef.compare(dual, data" in capsys.readouterr().err


def test_own_model_by_module_path_and_tuple_data(checkpoint, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(checkpoint))
    sys.modules.pop("mymodel", None)
    code = cli.main(own(checkpoint, "--top", "2", "--readout", "1", model="mymodel:build", data="tuple.pt"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("mymodel:build: ") and "readout 1" in out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "mymodel.py:nothing"}, "has no function 'nothing'"),
        ({"model": "mymodel.py"}, "takes pkg.module:function"),
        ({"model": "missing.py:build"}, "is not a file"),
        ({"model": "no_such_package.models:build"}, "cannot import 'no_such_package.models'"),
        ({"model": "mymodel.py:not_a_module"}, "returned a int, not a torch.nn.Module"),
        ({"model": "mymodel.py:broken"}, "failed: RuntimeError: no GPU here"),
        ({"init": "evil.pt"}, "holds objects other than tensors"),
        ({"init": "junk.pt"}, "is not a torch.save or safetensors file of tensors"),
        ({"init": "junk.safetensors"}, "cannot be read as tensors"),
        ({"trained": "missing.pt"}, "is not a file"),
        ({"trained": "data.pt"}, "must hold a state_dict"),
        ({"init": "partial.pt"}, "missing 0.bias, 2.bias, 2.weight"),
        ({"trained": "reshaped.pt"}, "of another shape 2.weight"),
        ({"data": "list.pt"}, "must hold a tensor, a tuple of tensors or a dict of tensors"),
        ({"data": None}, "--model needs --data too"),
    ],
)
def test_bad_own_model_files_are_one_line_and_exit_code_2(checkpoint, capsys, changes, message, monkeypatch):
    monkeypatch.chdir(checkpoint)
    code = cli.main(own(checkpoint, **changes))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (checkpoint / "PWNED").exists()


def test_own_model_files_without_model_are_refused(checkpoint, capsys):
    code = cli.main(["analyse", str(checkpoint), "--init", str(checkpoint / "init.pt")])
    _, err = capsys.readouterr()
    assert code == 2 and "--init is for your own model: add --model" in err
