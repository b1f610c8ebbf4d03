"""The architecture's import rules, read from every import statement in the tree (inside
functions too): reference/ and hw/ know neither host/, sim/ nor boards/; host/ knows no sim/.
The driver and the gateware load without torch (the weight-image layout is mmfree_fpga.image)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package folder -> the parts it must not import
FORBIDDEN = {
    "reference": {"host", "sim", "boards", "hw"},
    "hw": {"host", "sim", "boards"},
    "host": {"sim", "boards"},
}


def _imported_parts(path: Path, package: str):
    """(line, part) for every import of a mmfree_fpga part in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [f"mmfree_fpga.{package}.{node.module or ''}"]
            elif node.level >= 2:
                names = [f"mmfree_fpga.{node.module or ''}"]
            else:
                names = [node.module or ""]
                names += [f"{node.module}.{a.name}" for a in node.names if node.module == "mmfree_fpga"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mmfree_fpga" and len(parts) > 1:
                yield node.lineno, parts[1]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_parts_import_only_downward(package):
    crossings = [f"{path.relative_to(ROOT)}:{line} imports {part}"
                 for path in sorted((ROOT / package).glob("*.py"))
                 for line, part in _imported_parts(path, package) if part in FORBIDDEN[package]]
    assert crossings == []


def test_driver_and_gateware_load_without_torch():
    code = ("import sys, mmfree_fpga.host.driver, mmfree_fpga.hw.link, mmfree_fpga.hw.linked_engine; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
