"""The model bundle: the only contract between the training side and the device/server side.

A bundle is a folder with ``manifest.json`` (schema version, model id, input spec, latent and table layout,
invariances, classes, file roles with sha256 hashes) and the files it names: the encoder ONNX (uint8 frames -> int32
symbols), optionally an int8 encoder, the frozen entropy tables and the server-side classifier ONNX (symbols -> logits).
The model id is a content hash of the fp32 encoder and the tables (their integer CDF, precision and coder included):
two bundles with the same id decode the same bytes. The manifest is typed (``BundleManifest``): an unknown or mistyped
key is refused with its name. Schema 2 (integer CDF tables, the coder named in ``stream``) refuses schema-1 bundles
with the commands that convert them (``taskcodec bundle upgrade OLD --out NEW`` or a re-export).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskcodec.coding.tables import CODER, EntropyTables, TablesError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
DEFAULT_BUNDLE = Path(__file__).parent / "default_bundle"
REQUIRED_ROLES = ("encoder", "tables", "classifier")
CHECK = "crc16-ccitt(model_tag || u32le(n) || bytes) ^ 0xffff, 2 bytes little-endian, before the n coded bytes"
HOW_TO_UPGRADE = ("re-export it from its training run with `taskcodec export RUN --out BUNDLE`, or convert it "
                  "(same encoder, integer tables computed from its float tables, new golden vectors, new model id) "
                  "with `taskcodec bundle upgrade OLD --out NEW`")


# -- the typed manifest ----------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputModel(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    color_order: Literal["gray", "rgb", "bgr"]
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"
    normalisation: Optional[dict[str, Any]] = None


class StreamSpec(_Strict):
    """How payloads are coded: the coder's identity and CDF precision (docs/wire-format.md, "Per-frame payload")."""

    coder: Literal["taskcodec-range56"]
    precision_bits: int = Field(ge=1, le=24)
    check: str = CHECK


class BundleManifest(_Strict):
    """Every key a bundle manifest may have. Free-form sections (training metadata, int8 and ood reports) are
    dictionaries; everything the edge and server act on is typed."""

    schema_version: Literal[2]
    model_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    name: str
    created: Optional[str] = None
    input: InputModel
    latent_dim: int = Field(gt=0)
    classes: list[str] = []
    files: dict[str, str]
    sha256: dict[str, str]
    stream: StreamSpec
    entropy_tables: dict[str, Any] = {}
    invariances: Union[dict[str, Any], list[Any], None] = None
    objective: Optional[str] = None
    beta: Optional[float] = Field(default=None, strict=False)
    training: Optional[dict[str, Any]] = None
    int8: Optional[dict[str, Any]] = None
    ood: Optional[dict[str, Any]] = None
    backbone: Optional[dict[str, Any]] = None
    frozen_compressor: Optional[dict[str, Any]] = None
    upgraded_from: Optional[dict[str, Any]] = None
    # temporal coding (issue 15): {"file", "residual_tag", "key_interval", "same_l1", "fitted_on"}; the residual
    # tables file has role "residual_tables", is covered by sha256 like every file, and is NOT part of the model id
    # (adding it keeps the bundle's id and golden vectors): the residual tag binds COND payloads to it instead.
    temporal: Optional[dict[str, Any]] = None


def _manifest_problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        if err["type"] == "extra_forbidden":
            out.append(f"unknown key {key!r}")
        elif err["type"] == "missing":
            out.append(f"missing key {key!r}")
        else:
            out.append(f"key {key!r}: {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(out)


def validate_manifest(manifest: dict[str, Any], where: str = "bundle manifest") -> BundleManifest:
    try:
        return BundleManifest.model_validate(manifest)
    except ValidationError as exc:
        raise BundleError(f"{where}: {_manifest_problems(exc)}") from None


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
    """sha256 of the fp32 encoder's bytes and the tables' digest (coder, precision, integer CDF, supports, pmf)."""
    h = hashlib.sha256()
    h.update(encoder_path.read_bytes())
    h.update(EntropyTables.load(tables_path).digest().encode())
    return h.hexdigest()[:16]


def stream_spec(tables: EntropyTables) -> dict[str, Any]:
    return {"coder": CODER, "precision_bits": tables.precision, "check": CHECK}


def tables_section(tables: EntropyTables) -> dict[str, Any]:
    return {"file": "tables.npz", "cdf": f"uint32 [D, W + 1], row d: 0 < ... < 2**{tables.precision} over the "
            "length[d] support entries and the escape, padded with 2**precision",
            "pmf": "float32 [D, W]: pmf[d, i] = P(lower + i), pmf[d, length] = escape (estimates only)",
            "precision_bits": tables.precision}


class Bundle:
    def __init__(self, path: Path, manifest: dict[str, Any], spec: BundleManifest | None = None):
        self.path = path
        self.manifest = manifest
        self.spec = spec if spec is not None else validate_manifest(manifest)

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
        tables = EntropyTables.load(self.file("tables"), require_cdf=True)
        if tables.dim != self.latent_dim:
            raise BundleError(f"tables have {tables.dim} dimensions, the manifest says {self.latent_dim}")
        if tables.precision != self.spec.stream.precision_bits:
            raise BundleError(f"tables have a {tables.precision}-bit CDF, the manifest says "
                              f"{self.spec.stream.precision_bits}")
        return tables

    @cached_property
    def residual_tables(self) -> EntropyTables | None:
        """The temporal-coding residual tables (None: the bundle has none; `taskcodec bundle add-temporal`)."""
        if not self.has("residual_tables"):
            return None
        tables = EntropyTables.load(self.file("residual_tables"), require_cdf=True)
        if tables.dim != self.latent_dim:
            raise BundleError(f"residual tables have {tables.dim} dimensions, the manifest says {self.latent_dim}")
        return tables

    @property
    def residual_tag(self) -> bytes | None:
        """8 bytes naming (model, residual tables): the HELLO's residual tag, the check seed of COND payloads."""
        from taskcodec.coding.temporal import residual_tag

        tables = self.residual_tables
        return None if tables is None else residual_tag(self.model_tag, tables)

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
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} is not a JSON object")
    version = manifest.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise BundleError(f"bundle {path} has schema version {version}, older than this taskcodec's "
                          f"{SCHEMA_VERSION} (its payloads were coded with constriction and float tables): "
                          f"{HOW_TO_UPGRADE}")
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema version {version!r} is not supported (this taskcodec reads "
                          f"{SCHEMA_VERSION}): install the taskcodec release that wrote it, or a newer one")
    spec = validate_manifest(manifest, f"bundle manifest {manifest_path}")
    files = spec.files
    for role in REQUIRED_ROLES:
        if role not in files:
            raise BundleError(f"bundle manifest names no {role!r} file")
    for role, name in files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file for {role!r} is missing: {f}")
        expected = spec.sha256.get(name)
        if expected is None or _sha256(f) != expected:
            raise BundleError(f"bundle file {f} does not match its sha256 in the manifest (corrupt or edited)")
    bundle = Bundle(path, manifest, spec)
    try:
        bundle.tables
    except TablesError as exc:
        raise BundleError(str(exc)) from exc
    return bundle


def check_golden(bundle: Bundle) -> str | None:
    """Re-run the bundle's fp32 encoder and coder on its golden frames on *this* machine: None when symbols, bytes and
    decoded symbols all equal the committed ones, else what differs (a bundle without golden vectors is a problem too:
    nothing proves it decodes the same here). Used by `taskcodec models add` and by the runtime before a switch."""
    if not bundle.has("golden"):
        return "the bundle has no golden vectors (role 'golden'); re-export it"
    from taskcodec.coding import RangeCoder, StreamError, compress, decompress
    from taskcodec.providers import ort_session, run_batched

    try:
        with np.load(bundle.file("golden")) as z:
            frames, symbols, blob, offsets = z["frames"], z["symbols"], z["streams"].tobytes(), z["offsets"]
        now = run_batched(ort_session(bundle.encoder_path()), frames, 256)
    except Exception as exc:  # noqa: BLE001 (ORT and numpy raise their own types for unreadable files)
        return f"golden vectors could not be run: {type(exc).__name__}: {exc}"
    if now.shape != symbols.shape or not np.array_equal(now, symbols):
        bad = len(frames) if now.shape != symbols.shape else int((now != symbols).any(axis=1).sum())
        return f"encoder symbols differ from the golden symbols on {bad} of {len(frames)} frames"
    coder = RangeCoder(bundle.tables)
    for i, s in enumerate(symbols):
        stream = blob[offsets[i]: offsets[i + 1]]
        if compress(s, coder, bundle.model_tag) != stream:
            return f"coded bytes differ from the golden bytes at frame {i}"
        try:
            if not np.array_equal(decompress(stream, coder, bundle.model_tag), s):
                return f"decoded symbols differ from the golden symbols at frame {i}"
        except StreamError as exc:
            return f"golden payload {i} does not decode: {exc}"
    return None


# -- operator signatures (over-the-air rollout, issue 13) -------------------------------------------------------------
# ``manifest.sig`` next to the manifest: an Ed25519 signature over the exact bytes of manifest.json, which names every
# file's sha256, so the signature covers the whole bundle. Keys are PEM files (`taskcodec models keygen`).
SIGNATURE = "manifest.sig"


def generate_signing_key(private_path: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key: PEM private key at ``private_path`` (0600) and its public key at ``<path>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    import os

    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with open(fd, "wb") as f:
        f.write(pem)
    public = private_path.with_name(private_path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_bundle(path: str | Path, private_key_file: str | Path) -> dict[str, str]:
    """Write ``manifest.sig`` into the bundle folder; returns its content ({algorithm, key_id, signature})."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    bundle = load_bundle(path)
    try:
        key = serialization.load_pem_private_key(Path(private_key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read private key {private_key_file}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{private_key_file} is not an Ed25519 private key")
    data = (bundle.path / MANIFEST).read_bytes()
    sig = {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(data)).decode()}
    (bundle.path / SIGNATURE).write_text(json.dumps(sig, indent=2) + "\n")
    return sig


def load_public_keys(files: list[str | Path]) -> list[Any]:
    """Ed25519 public keys from PEM files (BundleError naming a file that is not one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = []
    for f in files:
        try:
            key = serialization.load_pem_public_key(Path(f).expanduser().read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read trusted key {f}: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"trusted key {f} is not an Ed25519 public key")
        keys.append(key)
    return keys


def check_signature(manifest_bytes: bytes, signature_json: bytes | None, public_keys: list[Any]) -> str | None:
    """None when ``signature_json`` (manifest.sig) is a valid Ed25519 signature of ``manifest_bytes`` by one of
    ``public_keys``, else why not."""
    import base64

    from cryptography.exceptions import InvalidSignature

    if not public_keys:
        return "no trusted operator key is configured (--trusted-key)"
    if signature_json is None:
        return f"the bundle is not signed ({SIGNATURE} missing)"
    try:
        sig = json.loads(signature_json)
        raw = base64.b64decode(sig["signature"], validate=True)
        algorithm = sig.get("algorithm")
    except (ValueError, KeyError, TypeError) as exc:
        return f"{SIGNATURE} is unreadable: {exc}"
    if algorithm != "ed25519":
        return f"{SIGNATURE}: unsupported algorithm {algorithm!r}"
    for key in public_keys:
        try:
            key.verify(raw, manifest_bytes)
            return None
        except InvalidSignature:
            continue
    return (f"bad signature: the manifest is not signed by a trusted operator key (signed by key "
            f"{str(sig.get('key_id'))[:16]}, trusted: {', '.join(key_id(k) for k in public_keys)})")


def write_bundle(out: str | Path, *, files: dict[str, Path], manifest: dict[str, Any]) -> Bundle:
    """Write a bundle folder from source files by role (encoder, tables, classifier, ...) and manifest fields."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    tables = None
    for role, src in files.items():
        name = {"encoder": "encoder.onnx", "encoder_int8": "encoder_int8.onnx", "tables": "tables.npz",
                "classifier": "classifier.onnx"}.get(role, Path(src).name)
        if role == "tables":  # written, not copied: a run's tables get their integer CDF here, once
            try:
                tables = EntropyTables.load(src)
            except TablesError as exc:
                raise BundleError(str(exc)) from exc
            data = tables.to_bytes()
            (out / name).write_bytes(data)
        elif Path(src).resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
        names[role] = name
    if tables is None:
        raise BundleError("a bundle needs a 'tables' file")
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=names, stream=stream_spec(tables),
                    entropy_tables=tables_section(tables))
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
    validate_manifest(manifest, "the manifest to write")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return load_bundle(out)


# -- schema 1 -> 2 ---------------------------------------------------------------------------------------------------

def upgrade_bundle(old: str | Path, out: str | Path) -> Bundle:
    """A schema-1 bundle -> a schema-2 bundle in ``out``: the same encoder, classifier and other files; the integer
    CDF quantised once from the float tables; golden streams re-coded from the golden symbols with the new coder and
    model tag (`taskcodec verify-bundle` re-runs the encoder on the golden frames); a new model id."""
    old, out = Path(old), Path(out)
    manifest_path = old / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{old} is not a readable taskcodec bundle: {exc}") from exc
    if manifest.get("schema_version") == SCHEMA_VERSION:
        raise BundleError(f"{old} already has schema version {SCHEMA_VERSION}: nothing to upgrade")
    if manifest.get("schema_version") != 1:
        raise BundleError(f"{old}: only schema-1 bundles can be upgraded, got {manifest.get('schema_version')!r}")
    for name, digest in manifest.get("sha256", {}).items():
        if not (old / name).is_file() or _sha256(old / name) != digest:
            raise BundleError(f"bundle file {old / name} is missing or does not match its sha256")
    if out.resolve() != old.resolve():
        if out.exists() and any(out.iterdir()):
            raise BundleError(f"{out} exists and is not empty")
        shutil.copytree(old, out, dirs_exist_ok=True)
    files = dict(manifest["files"])
    try:
        tables = EntropyTables.load(old / files["tables"])
    except TablesError as exc:
        raise BundleError(str(exc)) from exc
    (out / files["tables"]).write_bytes(tables.to_bytes())
    model_id = compute_model_id(out / files["encoder"], out / files["tables"])
    if "golden" in files:
        from taskcodec.coding import RangeCoder, compress

        with np.load(old / files["golden"]) as z:
            golden = {k: z[k] for k in z.files}
        coder = RangeCoder(tables)
        streams = [compress(s, coder, bytes.fromhex(model_id)) for s in golden["symbols"]]
        golden["offsets"] = np.cumsum([0] + [len(s) for s in streams]).astype(np.int64)
        golden["streams"] = np.frombuffer(b"".join(streams), np.uint8)
        np.savez_compressed(out / files["golden"], **golden)
    new = {k: v for k, v in manifest.items() if k not in ("sha256", "model_id")}
    new.update(schema_version=SCHEMA_VERSION, model_id=model_id, stream=stream_spec(tables),
               entropy_tables=tables_section(tables),
               upgraded_from={"model_id": manifest.get("model_id"), "schema_version": 1,
                              "how": "integer CDF quantised from the float tables (taskcodec bundle upgrade)"})
    return _write_manifest(out, new)


def register(app: Any) -> None:
    """`taskcodec bundle upgrade OLD --out NEW` (entry point taskcodec.commands: bundle)."""
    import typer

    group = typer.Typer(help="Model bundle maintenance.", no_args_is_help=True)
    app.add_typer(group, name="bundle")

    @group.command("upgrade")
    def upgrade_cmd(old: Path = typer.Argument(..., help="A schema-1 bundle folder."),
                    out: Path = typer.Option(..., "--out", help="Folder for the schema-2 bundle (new or empty).")) -> None:
        """Convert a schema-1 bundle: integer CDF tables from its float tables, the new coder, new golden vectors and
        model id; encoder and classifier unchanged. Check the result with `taskcodec verify-bundle NEW`."""
        try:
            bundle = upgrade_bundle(old, out)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        typer.echo(f"bundle {bundle.path} model id {bundle.model_id} (was {bundle.manifest['upgraded_from']['model_id']}), "
                   f"coder {bundle.spec.stream.coder}, {bundle.spec.stream.precision_bits}-bit CDF")
