"""The device and server side never import torch: every module of the core (taskcodec/*.py, taskcodec/coding/) and of
taskcodec/runtime/, taskcodec/server/ and taskcodec/firmware_bridge/ is imported in a fresh interpreter and torch must
not be among the loaded modules."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coding", "runtime", "server", "firmware_bridge")


def _modules() -> list[str]:
    names = [f"taskcodec.{p.stem}" for p in sorted((ROOT / "taskcodec").glob("*.py")) if p.stem != "__init__"]
    for pkg in PACKAGES:
        folder = ROOT / "taskcodec" / pkg
        if not (folder / "__init__.py").is_file():
            continue
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if "tests" in rel.parts or path.name == "__main__.py":
                continue
            parts = rel.parts[:-1] if path.name == "__init__.py" else rel.parts
            names.append(".".join(parts))
    return names


def test_device_and_server_modules_do_not_import_torch():
    modules = _modules()
    assert "taskcodec.runtime.capture" in modules and "taskcodec.wire" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'{name} imports torch'\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
