"""The package layout is the architecture: one import root, layers that only import downwards, no cycles.

The contracts live in pyproject.toml ([tool.importlinter]); this test runs them with import-linter, checks that every
module directly under taskcodec/ is placed in a layer (so a new one cannot slip past the contract), and that the
built wheel installs nothing but `taskcodec` at top level."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_hold():
    result = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                             "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in result.stdout


def test_every_top_level_module_has_a_layer():
    layers = next(c for c in _contracts() if c["id"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    children = {p.stem for p in (ROOT / "taskcodec").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert children, "taskcodec/ has no modules?"
    assert children <= placed, f"not in any layer of pyproject.toml: {sorted(children - placed)}"
    assert placed <= children, f"layers name modules that do not exist: {sorted(placed - children)}"


def test_wheel_installs_only_the_taskcodec_root(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("taskcodec-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["taskcodec"]
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    roots = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert roots == {"taskcodec"}, roots
    assert "taskcodec/default_bundle/manifest.json" in names
    assert any(n.startswith("taskcodec/firmware_bridge/c/") and n.endswith(".c") for n in names)
    # every part registers its own commands; the core CLI lists none of them
    assert "[taskcodec.commands]" in entry_points and "taskcodec.runtime.cli:register" in entry_points
    core_cli = (ROOT / "taskcodec" / "cli.py").read_text()
    assert not re.search(r"taskcodec\.(runtime|server|firmware_bridge|training|export|calibration|bench|demo)", core_cli)
