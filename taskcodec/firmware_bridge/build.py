"""Compile the firmware C sources with the system C compiler into a cache folder.

Outputs are keyed by a hash of the compiler, flags and sources, and written atomically (build to a temporary name,
then rename), so repeated builds are free and concurrent builds (parallel tests) never see half-written binaries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

C_DIR = Path(__file__).resolve().parent / "c"
# The entropy coder's one C source (also compiled into the Python extension taskcodec.coding._tcc by setup.py).
CODER_DIR = Path(__file__).resolve().parents[1] / "coding" / "c"

# target -> sources (the library sources first)
TARGETS: dict[str, tuple[str, ...]] = {
    "fw_camera_example": ("taskcodec_frames.c", "fw_camera_example.c"),
    "test_wire": ("taskcodec_wire.c", "test_wire.c"),
    "fuzz_wire": ("taskcodec_wire.c", "fuzz_wire.c"),
    "tcw_tool": ("taskcodec_wire.c", "tcw_tool.c"),
    "test_coder": ("taskcodec_coder.c", "test_coder.c"),
    "tcc_tool": ("taskcodec_coder.c", "tcc_tool.c"),
}
LIBRARY_SOURCES = ("taskcodec_wire.c", "taskcodec_frames.c", "taskcodec_coder.c")
HEADERS = ("taskcodec_wire.h", "taskcodec_frames.h", "taskcodec_coder.h")


def source(name: str) -> Path:
    """A C file by name: the firmware folder, else the coder folder."""
    path = C_DIR / name
    return path if path.is_file() else CODER_DIR / name

BASE_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]


class BuildError(RuntimeError):
    """No C compiler, or the sources did not compile (the message has the compiler's output)."""


def find_cc(cc: str | None = None) -> str:
    """The C compiler to use: ``cc`` argument, $CC, then cc, gcc, clang on PATH."""
    for name in ([cc] if cc else []) + [os.environ.get("CC", "")] + ["cc", "gcc", "clang"]:
        if name and (path := shutil.which(name)):
            return path
    if cc:
        raise BuildError(f"C compiler {cc!r} not found on PATH")
    raise BuildError("no C compiler found (looked for $CC, cc, gcc, clang): install one, e.g. `apt-get install gcc`, "
                     "or set CC=/path/to/compiler")


def cache_dir() -> Path:
    """$TASKCODEC_FIRMWARE_CACHE, else $XDG_CACHE_HOME/taskcodec/firmware, else ~/.cache/taskcodec/firmware."""
    if env := os.environ.get("TASKCODEC_FIRMWARE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "taskcodec" / "firmware"


def is_clang(cc: str) -> bool:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in out.lower()


def _flags(sanitize: bool, werror: bool, extra: list[str]) -> list[str]:
    return BASE_FLAGS + (["-Werror"] if werror else []) + (SANITIZE_FLAGS if sanitize else ["-O2"]) + extra


def _key(cc: str, flags: list[str], sources: tuple[str, ...]) -> str:
    h = hashlib.sha256(cc.encode() + b"\0" + " ".join(flags).encode())
    for name in sources + HEADERS:
        h.update(name.encode() + b"\0" + source(name).read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr.strip() or proc.stdout.strip()}")


def build(target: str, *, sanitize: bool = False, werror: bool = False, cc: str | None = None,
          out_dir: str | os.PathLike | None = None, libfuzzer: bool = False) -> Path:
    """Compile one target (see TARGETS) and return the executable's path (cached)."""
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    compiler = find_cc(cc)
    extra = ["-fsanitize=fuzzer", "-DTCW_LIBFUZZER"] if libfuzzer else []
    flags = _flags(sanitize or libfuzzer, werror, extra)
    sources = TARGETS[target]
    out = Path(out_dir) if out_dir else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-libfuzzer" if libfuzzer else "-san" if sanitize else ""
    exe = out / f"{target}{suffix}-{_key(compiler, flags, sources)}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    fd, tmp = tempfile.mkstemp(prefix=f".{target}-", dir=out)
    os.close(fd)
    try:
        _run([compiler, *flags, "-I", str(C_DIR), "-I", str(CODER_DIR), *(str(source(s)) for s in sources), "-o", tmp],
             f"compiling {target}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe


def build_library(*, cc: str | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """libtaskcodec_fw.a: the wire, frame-socket and entropy-coder code for linking into firmware (with the three
    headers)."""
    compiler = find_cc(cc)
    ar = shutil.which("ar")
    if ar is None:
        raise BuildError("`ar` not found: install binutils to build the static library")
    flags = _flags(False, False, [])
    out = Path(out_dir) if out_dir else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"libtaskcodec_fw-{_key(compiler, flags, LIBRARY_SOURCES)}.a"
    if lib.is_file():
        return lib
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        objects = []
        for src in LIBRARY_SOURCES:
            obj = Path(tmp) / (Path(src).stem + ".o")
            _run([compiler, *flags, "-c", "-I", str(C_DIR), "-I", str(CODER_DIR), str(source(src)), "-o", str(obj)],
                 f"compiling {src}")
            objects.append(str(obj))
        archive = Path(tmp) / "lib.a"
        _run([ar, "rcs", str(archive), *objects], "archiving the library")
        os.replace(archive, lib)
    return lib


def sanitizers_work(cc: str | None = None) -> bool:
    """Whether this compiler can build and run an AddressSanitizer/UBSan program here."""
    try:
        exe = build("test_wire", sanitize=True, cc=cc)
    except BuildError:
        return False
    return subprocess.run([str(exe)], capture_output=True, env=sanitizer_env(), timeout=120).returncode == 0


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for sanitized programs: stop at the first error; leak checks off because LeakSanitizer needs
    ptrace, which many containers forbid (the library allocates nothing anyway)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env
