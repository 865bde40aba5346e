"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_example_runs(capsys):
    blocks = python_blocks()
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "'nlo'" in out and "'path'" in out
    dual, data = namespace["dual"], namespace["run"].data
    by_order = {order: dual.completeness(data, order=order) for order in ("init", "nlo", "trained", "path")}
    assert by_order["path"] < 0.1 and by_order["path"] == min(by_order.values())
    assert namespace["table"].ids[0].startswith("encoder.weight[")
