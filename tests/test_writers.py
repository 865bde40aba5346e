"""Every file efffeat writes goes through one atomic writer: concurrent writers and readers see whole files, and
a symlink planted where a temporary file would go, or at the target, is never followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import mlp, perturbed
from test_io import Box

import efffeat as ef
from efffeat import _atomic, cli, io
from efffeat import distributed as dist

_WRITER = """
import sys
from pathlib import Path
from efffeat import cli
path, tag = Path(sys.argv[1]), sys.argv[2]
ranking = [{"rank": i + 1, "id": f"encoder.weight[{i},:]", "score": i / 7, "size": 3} for i in range(300)]
for i in range(300):
    cli._write_json(path, {"writer": tag, "i": i, "ranking": ranking})
"""


def test_concurrent_cli_writers_and_a_reader_see_only_whole_files(tmp_path):
    path = tmp_path / cli.ANALYSIS_FILE
    cli._write_json(path, {"writer": "first", "i": -1})
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag], stderr=subprocess.PIPE, text=True)
        for tag in "ab"
    ]
    reads, errors = 0, []
    while any(w.poll() is None for w in writers):
        try:
            json.loads(path.read_text())
            reads += 1
        except (OSError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        time.sleep(0.002)  # leave the writers a core
    failures = [w.stderr.read() for w in writers if w.wait() != 0]
    assert failures == [] and errors == [], (failures, errors[:3])
    assert reads > 10 and json.loads(path.read_text())["i"] == 299
    assert sorted(os.listdir(tmp_path)) == [cli.ANALYSIS_FILE]


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """``plant(target)``: symlinks to a victim file at the first temporary names a write of `target` would try,
    and at the fixed names older writers used. Returns the victim."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    first = ["aaaaaaaa", "bbbbbbbb"]
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter([*first, *(f"n{i:07d}" for i in range(99))]))

    def plant(target: Path) -> None:
        prefix = f".{target.name}.{_atomic._host()}.{os.getpid()}."
        for name in [
            *(prefix + c + _atomic.TMP_SUFFIX for c in first),
            f".{target.name}.tmp",
            f".{target.name}.partial",
        ]:
            (target.parent / name).symlink_to(victim)

    return victim, plant


def _assert_untouched(victim: Path, directory: Path) -> None:
    assert victim.read_text() == "untouched"
    links = [p for p in directory.iterdir() if p.is_symlink()]
    assert len(links) == 4 and all(p.resolve() == victim for p in links)  # planted links stay as they were


def test_saves_never_follow_planted_symlinks(tmp_path, planted):
    victim, plant = planted
    target = tmp_path / "box.safetensors"
    plant(target)
    io.save(Box({"x": torch.ones(3)}, {"v": 1}), target)
    assert io.load(target).meta == {"v": 1}
    _assert_untouched(victim, tmp_path)


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    target = tmp_path / "analysis.json"
    target.symlink_to(victim)
    cli._write_json(target, {"ok": True})
    assert not target.is_symlink() and json.loads(target.read_text()) == {"ok": True}
    assert victim.read_text() == "untouched"


def test_the_cli_json_and_report_writers_never_follow_planted_symlinks(tmp_path, planted, capsys):
    victim, plant = planted
    run_dir = tmp_path / "run"
    assert cli.main(["train", "tms", "--out", str(run_dir), "--steps", "5", "--set", "n_data=16"]) == 0
    links = tmp_path / "links"
    links.mkdir()
    report = links / "report.html"
    plant(links / cli.ANALYSIS_FILE)
    plant(report)
    (links / cli.RUN_FILE).write_bytes((run_dir / cli.RUN_FILE).read_bytes())
    assert cli.main(["analyse", str(links), "--report", str(report), "--dashboards", "0"]) == 0, capsys.readouterr()
    assert json.loads((links / cli.ANALYSIS_FILE).read_text())["order"] in ef.ORDERS
    assert "plotly-graph-div" in report.read_text()
    assert victim.read_text() == "untouched"
    assert sum(p.is_symlink() and p.resolve() == victim for p in links.iterdir()) == 8


def test_kernel_to_disk_never_follows_planted_symlinks(tmp_path, planted):
    victim, plant = planted
    torch.manual_seed(0)
    model = mlp(3, (4,), 2).double()
    dual = ef.DualModel(model, perturbed(model, 0.2), progress=False)
    x = torch.randn(7, 3, dtype=torch.float64)
    target = tmp_path / "kernel.npy"
    plant(target)
    on_disk = dist.kernel_to_disk(dual, x, target, block=2)
    np.testing.assert_allclose(np.array(on_disk), dual.features(x).kernel().numpy(), rtol=1e-13, atol=1e-13)
    _assert_untouched(victim, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(_atomic.TMP_SUFFIX) and not p.is_symlink()]
