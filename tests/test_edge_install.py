"""The base (edge) install on its own (issue 10 item 6): a fresh venv on the oldest supported Python (3.10 where this
machine has it), pip installing only the base package from this working tree while torch and constriction are made
unavailable to pip (a constraint no release satisfies), then that venv's `runtime capture` streams frames to a real
server (taskcodec.testing.ServerProcess, from the main environment) that stores and classifies every one of them.

The venv with the base dependencies is cached in the temp folder, keyed on pyproject.toml, setup.py and the
interpreter (the first run downloads wheels, ~1 min); the package itself is re-installed from the tree on every run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from taskcodec import testing
from taskcodec.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
FRAMES = 40
CAMERA = f"virtual://fashion-mnist?size=640x480&count={FRAMES}&seed=3"
ROI = (80, 0, 480, 480)
UNAVAILABLE = ("torch", "constriction")


def _python_version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([exe, "-c", "import sys, venv; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _oldest_python() -> tuple[str, tuple[int, int]]:
    """The oldest Python >= 3.10 on this machine (the package's floor), else the one running the tests."""
    candidates = [shutil.which(f"python3.{m}") for m in (10, 11, 12, 13)]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.1*/bin/python3.1*")
                         if p.name.count(".") == 1)
    found = []
    for exe in filter(None, candidates):
        version = _python_version(exe)
        if version is not None and version >= (3, 10):
            found.append((version, exe))
    if not found:
        return sys.executable, tuple(sys.version_info[:2])
    version, exe = min(found)
    return exe, version


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _tree_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored), so pip builds outside the shared tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file() and not name.startswith("bench/results/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory):
    """The cached venv, held under an exclusive lock for the module: runs of this file in parallel (a developer and
    the full suite) wait for each other instead of rebuilding or re-installing a venv the other is using."""
    lock = open(Path(tempfile.gettempdir()) / "taskcodec-edge-venv.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield _edge_venv(tmp_path_factory)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _edge_venv(tmp_path_factory):
    python, version = _oldest_python()
    key = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py"):
        if (REPO / name).exists():
            key.update((REPO / name).read_bytes())
    key.update(f"{python} {version}".encode())
    venv = Path(tempfile.gettempdir()) / f"taskcodec-edge-venv-{key.hexdigest()[:12]}"
    constraints = venv.parent / f"{venv.name}-unavailable.txt"
    constraints.write_text("".join(f"{name}<0\n" for name in UNAVAILABLE))  # no release satisfies these
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q"]
    env = dict(os.environ, PIP_CONSTRAINT=f"{os.environ.get('PIP_CONSTRAINT', '')} {constraints}".strip())
    env.pop("PYTHONPATH", None)
    tree = _tree_copy(tmp_path_factory.mktemp("tree"))
    if not (venv / ".deps-ok").exists():
        for stale in venv.parent.glob("taskcodec-edge-venv-*"):  # venvs of older pyproject.toml versions
            if stale.is_dir() and stale != venv:
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.is_file() and stale != constraints:
                stale.unlink(missing_ok=True)
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", venv], timeout=120)
        _run([*pip, "install", tree], env=env, timeout=600, cwd=venv.parent)  # base package + its dependencies
        (venv / ".deps-ok").write_text(f"{python} {version}\n")
    else:  # dependencies cached: re-install only the package, from the tree as it is now
        _run([*pip, "install", "--no-deps", "--force-reinstall", tree], env=env, timeout=300, cwd=venv.parent)
    return venv, version, env


def test_edge_venv_has_neither_torch_nor_constriction(edge_venv):
    venv, version, _ = edge_venv
    assert version >= (3, 10)
    probe = _run([venv / "bin" / "python", "-c",
                  "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
                  "for m in ('taskcodec', 'torch', 'constriction', 'numpy', 'onnxruntime', 'cv2', "
                  "'taskcodec.coding._tcc')}))"],
                 cwd=venv.parent)
    present = json.loads(probe.stdout)
    assert present["taskcodec"] and present["numpy"] and present["onnxruntime"] and present["cv2"]
    assert not present["torch"] and not present["constriction"], present
    if shutil.which("cc") or shutil.which("gcc"):  # the C coder builds at install time with a plain C compiler
        assert present["taskcodec.coding._tcc"], "the C entropy coder extension was not built by pip install"
    # the installed package is a copy (not this tree), and importing the edge parts does not need the missing ones
    _run([venv / "bin" / "python", "-c",
          "import taskcodec, taskcodec.bundle, taskcodec.coding, taskcodec.runtime.capture, taskcodec.firmware_bridge;"
          f"assert not taskcodec.__file__.startswith({str(REPO)!r}), taskcodec.__file__;"
          "b = taskcodec.bundle.load_bundle(None); print(b.model_id)"], cwd=venv.parent)


def test_edge_venv_streams_to_a_real_server(edge_venv, tmp_path):
    venv, _, env = edge_venv
    bundle = load_bundle(None)
    with testing.ServerProcess(bundle.path, tmp_path / "server.db") as srv:
        token = srv.add_camera("edge-venv").decode()
        report = tmp_path / "report.json"
        _run([venv / "bin" / "runtime", "capture", "--device", CAMERA, "--server", srv.url, "--camera-id",
              "edge-venv", "--token", token, "--roi", ",".join(map(str, ROI)), "--threads", "1",
              "--spool", tmp_path / "spool", "--frames", FRAMES, "--quiet", "--drain-timeout", 60,
              "--report", report], env=env, cwd=tmp_path, timeout=180)
        stored = srv.get_json(f"/v1/cameras/edge-venv/frames?limit={10 * FRAMES}")["frames"]
    result = json.loads(report.read_text())
    assert result["frames"] == result["acked"] == FRAMES and result["spool_depth"] == 0 and result["dropped"] == 0
    assert sorted(f["seq"] for f in stored) == list(range(FRAMES))
    # the server's predictions (from the venv's bytes) are the main environment's encoder + classifier on the same
    # frames: the edge install produced the same symbols
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source
    from taskcodec.server.classify import Classifier

    images = [f.image for f in open_source(CAMERA)]
    symbols = FrameEncoder(bundle, threads=1).symbols(Preprocessor(bundle.input, ROI).batch(images))
    expected = Classifier(bundle).predict(symbols)[0]
    got = {f["seq"]: f["prediction"] for f in stored}
    assert [got[i] for i in range(FRAMES)] == np.asarray(expected).tolist()
