"""Shared helpers for benchmark outputs: every number we publish goes to JSON + a markdown table that names the
machine it was measured on, so results from different hosts are never silently compared."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    # Read installed versions from package metadata: importing torch just to print its version is slow.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts and the versions of the libraries that shape timings and results."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "opencv": _version("opencv-python-headless") or _version("opencv-python"),
        "pillow": _version("pillow"),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One markdown line stating the machine, e.g. for the top of a results table."""
    info = info or machine_info()
    libs = ", ".join(f"{k} {info[k]}" for k in ("python", "numpy", "torch", "onnxruntime", "opencv", "pillow")
                     if info.get(k))
    return (f"Machine: {info['cpu']}, {info['usable_cores']} usable of {info['cores']} cores "
            f"({info['platform']}); {libs}.")


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]],
                   formats: dict[str, str] | None = None) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs, ``formats`` optional format specs by key."""
    formats = formats or {}
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if value is None:
                cells.append("–")
            elif key in formats and isinstance(value, (int, float)):
                cells.append(format(value, formats[key]))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename) so an interrupted run never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
