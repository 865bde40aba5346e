"""The shape of the house: data flows one way, factor algebra stays in factors.py, `import efffeat` stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "efffeat"
README = PACKAGE.parent / "README.md"

# Lower layers never import higher ones (imports inside functions count too). A module's layer is that of the
# longest prefix listed here.
LAYERS: dict[str, int] = {
    "efffeat.errors": 0,
    "efffeat._version": 0,
    "efffeat._check": 1,
    "efffeat._memory": 1,
    "efffeat._savable": 1,
    "efffeat._atomic": 1,
    "efffeat._autodiff": 1,
    "efffeat.nn": 1,
    "efffeat._swap": 1,
    "efffeat._data": 1,
    "efffeat.io": 2,
    "efffeat.factors": 2,
    "efffeat.ids": 2,
    "efffeat.readout": 2,
    "efffeat.readouts": 2,
    "efffeat.rules": 3,
    "efffeat.groups": 3,
    "efffeat.capture": 4,
    "efffeat.features": 4,
    "efffeat.dual": 5,
    "efffeat.ranking": 6,
    "efffeat.spectra": 6,
    "efffeat.search": 7,
    "efffeat.theory": 7,
    "efffeat.analysis": 8,
    "efffeat.distributed": 8,
    "efffeat.baselines": 9,
    "efffeat.viz": 10,
    "efffeat.zoo": 11,
    "efffeat.cli": 12,
    "efffeat.demo": 13,
    "efffeat": 14,  # the package face
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every efffeat import in a file, relative imports resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            # `from . import x` imports the submodule x; `from .m import f` imports m
            out += [(node.lineno, n if layer(n) is not None and n in _MODULES else target) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t == "efffeat" or t.startswith("efffeat.")]


_MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
FILES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "efffeat")


def test_every_module_has_a_layer():
    assert [m for m in _MODULES if layer(m) is None] == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_module_imports_a_module_above_it(path):
    own = layer(module_name(path))
    upward = [f"line {line}: {t}" for line, t in imported(path) if (layer(t) or 0) > own]
    assert upward == [], f"{module_name(path)} (layer {own}) imports higher modules"


def test_no_module_branches_on_factor_classes_but_factors():
    pattern = re.compile(r"isinstance\([^)]*\b(LowRankFactor|DenseFactor)\b")
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "factors.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_import_efffeat_does_not_import_heavy_packages():
    code = (
        "import sys, efffeat\n"
        "print(','.join(m for m in ('plotly', 'scipy', 'sklearn', 'transformer_lens', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_every_name_the_readme_uses_is_public():
    import efffeat as ef

    names = set(re.findall(r"\bef\.([A-Za-z_][A-Za-z0-9_]*)", README.read_text()))
    missing = sorted(n for n in names if not hasattr(ef, n))
    assert missing == []
    assert all(n in ef.__all__ for n in names)
