"""The `efffeat` command end to end on a tiny toy model: files written, output printed, exit codes, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import efffeat as ef
from efffeat import cli
from efffeat.search import max_activating

TINY = ["--steps", "30", "--set", "n_data=64", "--set", "batch_size=64", "--set", "lr=0.01"]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tms")
    assert cli.main(["train", "tms", "--out", str(directory), "--seed", "3", *TINY]) == 0
    return directory


def test_train_saves_a_run_that_loads(run_dir):
    run = ef.zoo.load(run_dir / cli.RUN_FILE)
    assert run.kind == "tms" and run.steps_done == 30 and run.config["seed"] == 3 and run.config["n_data"] == 64
    fresh = ef.zoo.tms(seed=3, n_data=64, batch_size=64, lr=0.01).train(steps=30, progress=False)
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[key], value)  # the command trained exactly this


def test_analyse_prints_completeness_and_ranking_and_writes_the_report(run_dir, capsys):
    report = run_dir / "report.html"
    code, out, err = run_cli(capsys, "analyse", run_dir, "--order", "nlo", "--report", report, "--dashboards", "1")
    assert code == 0, err
    run = ef.zoo.load(run_dir / cli.RUN_FILE)
    dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout, progress=False)
    for order in ef.ORDERS:
        value = dual.completeness(run.data, order=order)
        assert re.search(rf"^  {order} +{value:.4g}\b", out, re.M), (order, value, out)
    analysis = json.loads((run_dir / cli.ANALYSIS_FILE).read_text())
    assert analysis["order"] == "nlo" and analysis["group"] == "neuron"
    assert analysis["ranking"][0]["id"] in out and analysis["ranking"][0]["rank"] == 1
    assert report.is_file() and "plotly-graph-div" in report.read_text()
    assert f"report: {report}" in out


def test_search_prints_the_top_examples(run_dir, capsys):
    feature = "encoder.weight[:,1]"
    code, out, err = run_cli(capsys, "search", run_dir, "--feature", feature, "-k", "5")
    assert code == 0, err
    run = ef.zoo.load(run_dir / cli.RUN_FILE)
    dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout, progress=False)
    want = max_activating(dual, run.data, [feature], k=5, progress=False)[feature]
    rows = re.findall(r"^ +\d+\. example (\d+) +value (\S+)", out, re.M)
    assert [int(i) for i, _ in rows] == want.indices.tolist()
    assert [float(v) for _, v in rows] == pytest.approx(want.values.tolist(), rel=1e-3)


def test_compare_then_report_includes_the_comparison(run_dir, capsys):
    code, out, err = run_cli(capsys, "compare", run_dir, "--methods", "effective", "neurons", "pca")
    assert code == 0, err
    records = json.loads((run_dir / cli.COMPARISON_FILE).read_text())
    assert [r["method"] for r in records] == ["effective", "neurons", "pca"]
    out_path = run_dir / "again.html"
    code, out, err = run_cli(capsys, "report", run_dir, "--out", out_path, "--dashboards", "0")
    assert code == 0, err
    text = out_path.read_text()
    assert "<section id='comparison'>" in text and "<section id='geometry-of-the-toy-model'>" in text


def test_help_everywhere(capsys):
    for argv in ([], *[[c] for c in ("train", "analyse", "search", "compare", "report")]):
        code, out, _ = run_cli(capsys, *argv, "--help")
        assert code == 0 and out.startswith("usage: efffeat"), argv


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyse", "{missing}"], "is not a directory"),
        (["search", "{empty}", "--feature", "x"], "no run in"),
        (["search", "{run}", "--feature", "encoder.wieght[0,:]", "-k", "2"], "unknown feature id"),
        (["search", "{run}", "--feature", "encoder.weight[9,:]", "-k", "2"], "out of range"),
        (["analyse", "{run}", "--report", "{missing}/r.html"], "does not exist"),
        (["analyse", "{run}", "--order", "fourth"], "invalid choice: 'fourth'"),
        (["search", "{run}"], "--feature"),
        (["train", "tms", "--out", "{empty}", "--set", "colour=blue"], "colour"),
        (["report", "{corrupt}"], "corrupt"),
        (["frobnicate"], "invalid choice"),
        (["train", "tms", "--out", "{new}", "--set", "n_features=abc"], "n_features must be a positive integer"),
        (["train", "tms", "--out", "{new}", "--set", "n_features=1e400"], "n_features must be a positive integer"),
        (["train", "tms", "--out", "{new}", "--set", "lr=NaN"], "lr must be a positive finite number"),
        (["train", "tms", "--out", "{new}", "--set", "batch_size=0"], "batch_size must be a positive integer"),
        (["train", "tms", "--out", "{new}", "--set", "sparsity=1"], "sparsity must be below 1"),
        (["train", "digits", "--out", "{new}", "--set", "hidden=[32,-1]"], "hidden[1] must be a positive integer"),
        (["train", "tms", "--out", "{new}", "--set", "n_hidden=30000", "--set", "n_features=30000"], "more than"),
        (["train", "tms", "--out", "{new}", "--steps", "1e20"], "--steps: expected an integer"),
        (["train", "tms", "--out", "{new}", "--steps", str(10**20)], "--steps must be at most"),
        (["train", "tms", "--out", "{new}", "--seed", "-3"], "seed must be an integer ≥ 0"),
        (["train", "tms", "--out", "{run}"], "already exists; pass --force"),
        (["search", "{listed}", "--feature", "encoder.weight[0,:]"], "analysis.json must be an object"),
        (["report", "{truncated}"], "comparison.json is not what efffeat wrote there"),
        (["report", "{binary}"], "analysis.json is not what efffeat wrote there"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, run_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / cli.RUN_FILE).write_bytes((run_dir / cli.RUN_FILE).read_bytes()[:-100])
    (tmp_path / "empty").mkdir()
    places = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "run": run_dir, "corrupt": corrupt}
    places["new"] = tmp_path / "new"
    for name, file, content in [
        ("listed", cli.ANALYSIS_FILE, b"[]"),
        ("truncated", cli.COMPARISON_FILE, b'[{"method": "pca", "mmcs": 0.5'),
        ("binary", cli.ANALYSIS_FILE, b"\xff\xfe\x00junk"),
    ]:
        places[name] = tmp_path / name
        places[name].mkdir()
        (places[name] / cli.RUN_FILE).write_bytes((run_dir / cli.RUN_FILE).read_bytes())
        (places[name] / file).write_bytes(content)
    code, out, err = run_cli(capsys, *[a.format(**places) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efffeat") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()  # refused before anything was built or written


def test_train_overwrites_a_run_only_with_force(run_dir, capsys):
    before = (run_dir / cli.RUN_FILE).read_bytes()
    code, _, err = run_cli(capsys, "train", "tms", "--out", run_dir, "--seed", "3", *TINY)
    assert code == 2 and (run_dir / cli.RUN_FILE).read_bytes() == before, err
    code, _, err = run_cli(capsys, "train", "tms", "--out", run_dir, "--seed", "3", "--force", *TINY)
    assert code == 0 and ef.zoo.load(run_dir / cli.RUN_FILE).config["seed"] == 3, err  # the same run, again


_FULL_DISK = """
import resource, signal, sys
from efffeat import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_full_disk_is_exit_code_2_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "tms", "--out", str(out), *TINY]
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, *argv], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "could not write" in lines[0], done.stderr
    assert list(out.iterdir()) == []


def test_unexpected_failure_is_exit_code_1_with_traceback_under_debug(run_dir, capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_search", broken)
    code, _, err = run_cli(capsys, "search", run_dir, "--feature", "x")
    assert code == 1
    assert err.strip() == (
        "efffeat search: unexpected error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)"
    )
    code, _, err = run_cli(capsys, "search", run_dir, "--feature", "x", "--debug")
    assert code == 1 and "Traceback" in err and err.strip().endswith("ZeroDivisionError: division by zero")


def test_the_process_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "efffeat.cli", "search", str(tmp_path / "nowhere"), "--feature", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
