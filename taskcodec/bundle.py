"""The model bundle: the only contract between the training side and the device/server side.

A bundle is a folder with ``manifest.json`` (schema version, model id, input spec, latent and table layout,
invariances, classes, file roles with sha256 hashes) and the files it names: the encoder ONNX (uint8 frames -> int32
symbols), optionally an int8 encoder, the frozen entropy tables and the server-side classifier ONNX (symbols -> logits).
The model id is a content hash of the fp32 encoder and the tables: two bundles with the same id decode the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from taskcodec.coding.tables import EntropyTables, TablesError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_BUNDLE = Path(__file__).parent / "default_bundle"
REQUIRED_ROLES = ("encoder", "tables", "classifier")


class BundleError(RuntimeError):
    """A bundle that cannot be used: missing files, wrong schema, hash mismatch."""


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: uint8 NHWC frames of this size; colour order "gray", "rgb" or "bgr"."""

    height: int
    width: int
    channels: int
    color_order: str

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(int(d["height"]), int(d["width"]), int(d["channels"]), str(d["color_order"]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute_model_id(encoder_path: Path, tables_path: Path) -> str:
    h = hashlib.sha256()
    h.update(encoder_path.read_bytes())
    h.update(EntropyTables.load(tables_path).digest().encode())
    return h.hexdigest()[:16]


class Bundle:
    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def model_tag(self) -> bytes:
        """8 bytes that bind streams and packets to this model."""
        return bytes.fromhex(self.model_id)

    @property
    def input(self) -> InputSpec:
        return InputSpec.from_manifest(self.manifest["input"])

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    def has(self, role: str) -> bool:
        return role in self.manifest["files"]

    def file(self, role: str) -> Path:
        if role not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no {role!r} file (it has: {', '.join(self.manifest['files'])})")
        return self.path / self.manifest["files"][role]

    def encoder_path(self, precision: str = "fp32") -> Path:
        if precision not in ("fp32", "int8"):
            raise BundleError(f"precision must be fp32 or int8, got {precision!r}")
        if precision == "int8" and not self.has("encoder_int8"):
            raise BundleError(f"bundle {self.path} has no int8 encoder; make one with `taskcodec calibrate`")
        return self.file("encoder" if precision == "fp32" else "encoder_int8")

    @cached_property
    def tables(self) -> EntropyTables:
        tables = EntropyTables.load(self.file("tables"))
        if tables.dim != self.latent_dim:
            raise BundleError(f"tables have {tables.dim} dimensions, the manifest says {self.latent_dim}")
        return tables

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model_id={self.model_id})"


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Load and validate a bundle (schema, required files, hashes). ``None`` is the embedded default bundle."""
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a taskcodec bundle: {MANIFEST} not found")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema version {version!r} is not supported (this taskcodec reads {SCHEMA_VERSION})")
    files = manifest.get("files", {})
    for role in REQUIRED_ROLES:
        if role not in files:
            raise BundleError(f"bundle manifest names no {role!r} file")
    for role, name in files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file for {role!r} is missing: {f}")
        expected = manifest.get("sha256", {}).get(name)
        if expected is None or _sha256(f) != expected:
            raise BundleError(f"bundle file {f} does not match its sha256 in the manifest (corrupt or edited)")
    bundle = Bundle(path, manifest)
    try:
        bundle.tables
    except TablesError as exc:
        raise BundleError(str(exc)) from exc
    return bundle


def write_bundle(out: str | Path, *, files: dict[str, Path], manifest: dict[str, Any]) -> Bundle:
    """Write a bundle folder from source files by role (encoder, tables, classifier, ...) and manifest fields."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for role, src in files.items():
        name = {"encoder": "encoder.onnx", "encoder_int8": "encoder_int8.onnx", "tables": "tables.npz",
                "classifier": "classifier.onnx"}.get(role, Path(src).name)
        if Path(src).resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
        names[role] = name
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=names)
    manifest["model_id"] = compute_model_id(out / names["encoder"], out / names["tables"])
    return _write_manifest(out, manifest)


def add_file(bundle: Bundle, role: str, src: Path, name: str | None = None, **fields: Any) -> Bundle:
    """Add or replace one file (e.g. the int8 encoder) without changing the model id; extra manifest fields too."""
    name = name or Path(src).name
    if Path(src).resolve() != (bundle.path / name).resolve():
        shutil.copyfile(src, bundle.path / name)
    manifest = dict(bundle.manifest, **fields)
    manifest["files"] = dict(manifest["files"], **{role: name})
    return _write_manifest(bundle.path, manifest)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> Bundle:
    manifest["sha256"] = {name: _sha256(out / name) for name in manifest["files"].values()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return load_bundle(out)
