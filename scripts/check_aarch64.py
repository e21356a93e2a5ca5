"""The two halves of scripts/check-aarch64.sh: what runs on this x86 host and what runs in the arm64 root.

    python3 scripts/check_aarch64.py x86-prepare WORK      # x86: reference frames, symbols and bytes -> WORK/x86.npz
    python  scripts/check_aarch64.py arm-run WORK          # aarch64 (edge install): the same work -> WORK/arm.npz
    python3 scripts/check_aarch64.py x86-compare WORK OUT  # x86: bit-exact comparison -> OUT/aarch64.{json,md}

Only the base (edge) package is used on the aarch64 side: no torch, no dataset (the frames travel in x86.npz).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

FM_FRAMES = 1000                     # Fashion-MNIST test frames (the bundle's 28x28 input)
CAMERA_FRAMES = 40                   # virtual 640x480 BGR camera frames per ROI setting, through preprocessing
CAMERA = "virtual://fashion-mnist?size=640x480&channels=3&count={n}&seed=7{extra}"
ROIS = {"roi 480x480 (bench runtime)": ("", (80, 0, 480, 480)),
        "roi 112x112 (demo)": ("&item=112", (264, 184, 112, 112))}
PRECISIONS = ("fp32", "int8")


def _versions() -> dict:
    out = {"machine": platform.machine(), "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("taskcodec", "numpy", "onnxruntime", "opencv-python-headless", "torch", "constriction"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _coders(bundle) -> dict:
    """Every entropy coder backend this install has (the C extension and the numpy/Python fallback)."""
    from taskcodec.coding import RangeCoder

    try:
        from taskcodec.coding.range_coder import BACKENDS, c_available
    except ImportError:  # the constriction coder (before the bundle-defined coder): one backend
        return {"constriction": RangeCoder(bundle.tables)}
    return {name: RangeCoder(bundle.tables, backend=name) for name in BACKENDS if name != "c" or c_available()}


def _pack(streams: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(s) for s in streams]).astype(np.int64)
    return np.frombuffer(b"".join(streams), np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    data = blob.tobytes()
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _symbols(bundle, precision: str, frames: np.ndarray) -> np.ndarray:
    from taskcodec.runtime.encoder import FrameEncoder

    enc = FrameEncoder(bundle, precision, threads=1, providers="cpu")
    return np.concatenate([enc.symbols(np.ascontiguousarray(frames[i:i + 250])) for i in range(0, len(frames), 250)])


def _encode_all(bundle, frames_by_key: dict, out: dict, timings: dict) -> None:
    """Encoder symbols for each precision and the preprocessing of the camera frames (both sides run this)."""
    from taskcodec.runtime.preprocess import Preprocessor

    for precision in PRECISIONS:
        if precision == "int8" and not bundle.has("encoder_int8"):
            continue
        t = time.perf_counter()
        out[f"sym_{precision}"] = _symbols(bundle, precision, frames_by_key["fm_frames"])
        timings[f"encoder_{precision}_s"] = time.perf_counter() - t
    for k, (name, (_, roi)) in enumerate(ROIS.items()):
        pre = Preprocessor(bundle.input, roi)
        t = time.perf_counter()
        out[f"cam{k}_pre"] = np.concatenate([pre(f) for f in frames_by_key[f"cam{k}_frames"]])
        timings[f"preprocess_cam{k}_s"] = time.perf_counter() - t
        out[f"cam{k}_sym_fp32"] = _symbols(bundle, "fp32", out[f"cam{k}_pre"])


def x86_prepare(work: Path) -> None:
    from taskcodec.bundle import load_bundle
    from taskcodec.coding import compress
    from taskcodec.data import load_fashion_mnist
    from taskcodec.runtime.sources import open_source

    bundle = load_bundle(None)
    images, labels = load_fashion_mnist("test")
    data = {"fm_frames": images[:FM_FRAMES].reshape(-1, 28, 28, 1).astype(np.uint8), "fm_labels": labels[:FM_FRAMES]}
    for k, (name, (extra, roi)) in enumerate(ROIS.items()):
        src = open_source(CAMERA.format(n=CAMERA_FRAMES, extra=extra))
        data[f"cam{k}_frames"] = np.stack([f.image for f in src])
    out, timings = dict(data), {}
    _encode_all(bundle, data, out, timings)
    coders = _coders(bundle)
    reference = next(iter(coders))  # the default backend ("c" where built)
    for name, coder in coders.items():
        for precision in PRECISIONS:
            if f"sym_{precision}" in out:
                blob, offsets = _pack([compress(s, coder, bundle.model_tag) for s in out[f"sym_{precision}"]])
                out[f"streams_{precision}_{name}"], out[f"offsets_{precision}_{name}"] = blob, offsets
    same = all(np.array_equal(out[f"streams_{p}_{n}"], out[f"streams_{p}_{reference}"])
               for n in coders for p in PRECISIONS if f"streams_{p}_{n}" in out)
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(work / "x86.npz", **out)
    (work / "x86.json").write_text(json.dumps({"versions": _versions(), "model_id": bundle.model_id,
                                               "backends": list(coders), "reference_backend": reference,
                                               "backends_agree_on_x86": bool(same), "timings": timings}, indent=2))


def arm_run(work: Path) -> None:
    from taskcodec.bundle import load_bundle
    from taskcodec.coding import compress, decompress

    bundle = load_bundle(None)
    info = json.loads((work / "x86.json").read_text())
    with np.load(work / "x86.npz") as z:
        x86 = {k: z[k] for k in z.files}
    out, timings = {}, {}
    _encode_all(bundle, x86, out, timings)
    coders = _coders(bundle)
    ref = info["reference_backend"]
    for name, coder in coders.items():
        for precision in PRECISIONS:
            key = f"streams_{precision}_{ref}"
            if key not in x86:
                continue
            streams = _unpack(x86[key], x86[f"offsets_{precision}_{ref}"])
            t = time.perf_counter()
            decoded = []
            for s in streams:
                try:
                    decoded.append(decompress(s, coder, bundle.model_tag))
                except Exception:  # counted as a mismatch (a row of a value no symbol takes)
                    decoded.append(np.full(bundle.latent_dim, np.iinfo(np.int32).min, np.int32))
            timings[f"decode_{precision}_{name}_s"] = time.perf_counter() - t
            out[f"decoded_{precision}_{name}"] = np.stack(decoded)
            t = time.perf_counter()
            blob, offsets = _pack([compress(s, coder, bundle.model_tag) for s in x86[f"sym_{precision}"]])
            timings[f"encode_{precision}_{name}_s"] = time.perf_counter() - t
            out[f"streams_{precision}_{name}"], out[f"offsets_{precision}_{name}"] = blob, offsets
    np.savez_compressed(work / "arm.npz", **out)
    (work / "arm.json").write_text(json.dumps({"versions": _versions(), "model_id": bundle.model_id,
                                               "backends": list(coders), "timings": timings}, indent=2))


def _equal_rows(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return 0
    return int((a.reshape(len(a), -1) == b.reshape(len(b), -1)).all(axis=1).sum())


def x86_compare(work: Path, out_dir: Path, times_file: Path | None, qemu: str, qemu_cpu: str) -> int:
    from taskcodec.bundle import load_bundle
    from taskcodec.coding import decompress
    from taskcodec.report import machine_info

    bundle = load_bundle(None)
    xi, ai = json.loads((work / "x86.json").read_text()), json.loads((work / "arm.json").read_text())
    with np.load(work / "x86.npz") as z:
        x86 = {k: z[k] for k in z.files}
    with np.load(work / "arm.npz") as z:
        arm = {k: z[k] for k in z.files}
    checks = []

    def check(name: str, equal: int, total: int, detail: str = "") -> None:
        checks.append({"check": name, "equal": int(equal), "total": int(total), "bit_exact": bool(equal == total),
                       "detail": detail})

    for backend in ai["backends"]:
        rc_file, txt_file = work / f"verify-{backend}.rc", work / f"verify-{backend}.txt"
        if rc_file.exists():
            rc, text = int(rc_file.read_text()), txt_file.read_text().strip()
            check(f"taskcodec verify-bundle (golden vectors), coder {backend}", int(rc == 0), 1,
                  text.splitlines()[-1] if text else "")
    for precision in PRECISIONS:
        if f"sym_{precision}" in x86:
            check(f"{precision} encoder symbols, {FM_FRAMES} Fashion-MNIST frames", _equal_rows(arm[f"sym_{precision}"],
                  x86[f"sym_{precision}"]), len(x86[f"sym_{precision}"]))
    for k, name in enumerate(ROIS):
        n = len(x86[f"cam{k}_pre"])
        check(f"preprocessing of 640x480 BGR camera frames, {name}", _equal_rows(arm[f"cam{k}_pre"],
              x86[f"cam{k}_pre"]), n)
        check(f"fp32 symbols of those frames, {name}", _equal_rows(arm[f"cam{k}_sym_fp32"], x86[f"cam{k}_sym_fp32"]), n)
    ref = xi["reference_backend"]
    x86_coder = _coders(bundle)[ref]
    for backend in ai["backends"]:
        for precision in PRECISIONS:
            if f"decoded_{precision}_{backend}" not in arm:
                continue
            sym = x86[f"sym_{precision}"]
            check(f"x86 bytes ({ref}) decoded on aarch64 ({backend}), {precision} symbols",
                  _equal_rows(arm[f"decoded_{precision}_{backend}"], sym), len(sym))
            ours = _unpack(x86[f"streams_{precision}_{ref}"], x86[f"offsets_{precision}_{ref}"])
            theirs = _unpack(arm[f"streams_{precision}_{backend}"], arm[f"offsets_{precision}_{backend}"])
            check(f"aarch64 ({backend}) bytes == x86 bytes, {precision} symbols",
                  sum(a == b for a, b in zip(theirs, ours)), len(ours))
            back = 0
            for s, data in zip(sym, theirs):
                try:
                    back += int(np.array_equal(decompress(data, x86_coder, bundle.model_tag), s))
                except Exception:
                    pass
            check(f"aarch64 ({backend}) bytes decoded back on x86 ({ref}), {precision} symbols", back, len(sym))
    times = {}
    if times_file is not None and times_file.exists():
        for line in times_file.read_text().split():
            key, _, value = line.partition("=")
            times[key] = int(value)
    ok = all(c["bit_exact"] for c in checks) and bool(checks)
    result = {"all_bit_exact": ok, "model_id": bundle.model_id, "checks": checks,
              "x86": {**machine_info(), **xi["versions"], "backends": xi["backends"],
                      "backends_agree_on_x86": xi["backends_agree_on_x86"]},
              "aarch64": {**ai["versions"], "backends": ai["backends"], "emulator": qemu, "qemu_cpu": qemu_cpu,
                          "root": "Debian bookworm arm64 (mmdebstrap), venv with the base package from the working "
                                  "tree (pip, no extras)", "timings_s": ai["timings"]},
              "times_s": times, "command": "bash scripts/check-aarch64.sh",
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "aarch64.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "aarch64.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if ok else 1


def markdown(r: dict) -> str:
    a, x = r["aarch64"], r["x86"]
    lines = [f"# aarch64 check ({r['command']}): {'all bit-exact' if r['all_bit_exact'] else 'NOT bit-exact'}", "",
             f"Bundle {r['model_id']}. aarch64: {a['platform']} under {a['emulator']} (QEMU_CPU={a['qemu_cpu']}), "
             f"Python {a['python']}, numpy {a['numpy']}, onnxruntime {a['onnxruntime']}, opencv "
             f"{a['opencv-python-headless']}, torch {a['torch']}, constriction {a['constriction']}; coder backends "
             f"{', '.join(a['backends'])}. x86: {x['cpu']}, Python {x['python']}, onnxruntime {x['onnxruntime']}, "
             f"opencv {x['opencv']}; coder backends {', '.join(x['backends'])} (agree on x86: "
             f"{x['backends_agree_on_x86']}). {r['time']}.", "",
             "| check | equal / total | bit-exact |", "|---|---|---|"]
    for c in r["checks"]:
        detail = f" ({c['detail']})" if c["detail"] else ""
        lines.append(f"| {c['check']}{detail} | {c['equal']} / {c['total']} | {'yes' if c['bit_exact'] else 'NO'} |")
    if r["times_s"]:
        t = r["times_s"]
        lines += ["", "Wall time of this run (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in t.items())
                  + " (root, wheels and venv are cached in ~/.cache/taskcodec-aarch64; a run that builds them is the "
                    "cold time)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("x86-prepare", "arm-run"):
        sub.add_parser(name).add_argument("work", type=Path)
    cmp = sub.add_parser("x86-compare")
    cmp.add_argument("work", type=Path)
    cmp.add_argument("out", type=Path)
    cmp.add_argument("--times", type=Path)
    cmp.add_argument("--qemu", default="")
    cmp.add_argument("--qemu-cpu", default="max")
    args = ap.parse_args(argv)
    if args.cmd == "x86-prepare":
        x86_prepare(args.work)
    elif args.cmd == "arm-run":
        arm_run(args.work)
    else:
        return x86_compare(args.work, args.out, args.times, args.qemu, args.qemu_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
