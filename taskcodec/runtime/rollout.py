"""Over-the-air model rollout, camera side (issue 13 item 2; server/registry.py is the other half).

With at least one trusted operator key (``runtime capture --trusted-key KEY.pub``, or ``trusted_keys:`` in the YAML)
the runtime polls ``GET /v1/cameras/ID/assignment`` (its own camera token) every ``rollout_poll`` seconds. When the
assigned model differs from the one it runs it downloads the bundle over the same authenticated channel
(``GET /v1/models/ID/files/NAME``) and refuses it unless, in this order:

1. ``manifest.sig`` is an Ed25519 signature of the exact ``manifest.json`` bytes by a trusted key (checked before
   any other file is fetched);
2. the manifest is a valid bundle manifest whose model id is the assigned one;
3. every file's sha256 equals the (signed) manifest's, as it is downloaded;
4. the bundle loads (schema, hashes again), its model id equals the hash of its encoder and tables, and its golden
   vectors reproduce bit-exactly on this device (``taskcodec.bundle.check_golden``);
5. the encoder opens with this camera's precision and providers and the preprocessing fits its input.

A verified bundle is switched to at the next frame boundary (``at_frame_boundary`` in the capture loop): frames
captured from then on are encoded and spooled under the new model; frames already spooled keep their model and the
uplink sends them under it first (one model per connection, spool.py / uplink.py), which the server still decodes.
A refused bundle changes nothing: the old model keeps running, the reason is logged and reported to the server
(``POST /v1/cameras/ID/assignment/status``; `taskcodec models status`), and the same model is not fetched again
until the assignment changes. The model in use is remembered in ``<models_dir>/current`` so a restart runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskcodec.bundle import (MANIFEST, SIGNATURE, Bundle, BundleError, check_golden, check_signature,
                              compute_model_id, load_bundle, load_public_keys, validate_manifest)

log = logging.getLogger(__name__)
CURRENT = "current"
MAX_FILE_BYTES = 256 << 20


class Refused(Exception):
    """The assigned bundle fails verification (the message is the reason the operator sees)."""


def http_base(server: str) -> str:
    """``ws://h:p`` / ``http://h:p[/path]`` -> ``http://h:p`` (the REST routes live beside /v1/stream)."""
    parts = urllib.parse.urlsplit(server.strip() if "://" in server else "http://" + server.strip())
    scheme = {"ws": "http", "http": "http", "wss": "https", "https": "https"}.get(parts.scheme.lower(), "http")
    path = parts.path.rstrip("/")
    if path.endswith("/v1/stream"):
        path = path[: -len("/v1/stream")]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def models_dir(config) -> Path:
    if getattr(config, "models_dir", None):
        return Path(config.models_dir).expanduser()
    spool = Path(config.spool).expanduser()
    return (spool.parent if spool.suffix in (".sqlite3", ".db", ".sqlite") else spool) / "models"


def startup_bundle(config) -> Bundle | None:
    """The bundle a previous rollout switched this camera to (``<models_dir>/current``), if rollout is on and it still
    loads; None otherwise (the configured bundle is used)."""
    if not getattr(config, "trusted_keys", None):
        return None
    folder = models_dir(config)
    try:
        model_id = (folder / CURRENT).read_text().strip()
    except OSError:
        return None
    try:
        bundle = load_bundle(folder / model_id)
    except BundleError as exc:
        log.error("rollout: the model this camera last switched to (%s) no longer loads (%s); using the configured "
                  "bundle", model_id, exc)
        return None
    log.warning("rollout: running model %s (switched to over the air; %s)", model_id, folder / model_id)
    return bundle


@dataclass
class _Ready:
    bundle: Bundle
    preprocess: Any
    encoder: Any


class RolloutAgent:
    """One per CaptureRuntime; its thread polls and verifies, the capture thread switches."""

    def __init__(self, runtime, *, opener=None):
        cfg = runtime.config
        self.rt = runtime
        self.keys = load_public_keys(cfg.trusted_keys)  # a bad key file fails at start, like a bad bundle
        self.poll_s = cfg.rollout_poll
        self.base = http_base(cfg.server)
        self.camera_id = cfg.camera_id
        self.token = cfg.resolved_token()
        self.dir = models_dir(cfg)
        self.context = ssl.create_default_context() if self.base.startswith("https") else None
        self.refused: dict[str, str] = {}     # model id -> reason (not fetched again while it stays assigned)
        self.ready: _Ready | None = None      # verified, waiting for a frame boundary
        self.switches = 0
        self.last_error: str | None = None
        self._reported: tuple | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> "RolloutAgent":
        self._thread = threading.Thread(target=self._main, name=f"rollout-{self.camera_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                self.last_error = None
            except (OSError, ValueError, urllib.error.URLError) as exc:  # server unreachable: try again next poll
                if str(exc) != self.last_error:
                    log.warning("rollout: assignment check failed: %s", exc)
                self.last_error = str(exc)
            except Exception as exc:  # noqa: BLE001 (a bug here must not stop the camera; it is logged)
                log.exception("rollout: unexpected error: %r", exc)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> urllib.request.Request:
        headers = {"Authorization": f"Bearer {self.token}", "X-Camera-Id": self.camera_id}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.base + path, data=data, headers=headers)

    def _get(self, path: str, limit: int = MAX_FILE_BYTES) -> bytes:
        with urllib.request.urlopen(self._request(path), timeout=30, context=self.context) as r:
            data = r.read(limit + 1)
        if len(data) > limit:
            raise Refused(f"{path} is larger than {limit} bytes")
        return data

    def report(self, model_id: str, state: str, reason: str = "") -> None:
        running = self.rt.bundle.model_id
        key = (model_id, state, reason, running)
        if key == self._reported:
            return
        cam = urllib.parse.quote(self.camera_id, safe="")
        try:
            with urllib.request.urlopen(self._request(f"/v1/cameras/{cam}/assignment/status", {
                    "model_id": model_id, "state": state, "reason": reason, "running_model_id": running}),
                    timeout=30, context=self.context):
                pass
            self._reported = key
        except (OSError, urllib.error.URLError) as exc:
            log.warning("rollout: could not report %s for model %s to the server: %s", state, model_id, exc)

    # -- the check -------------------------------------------------------------------------------------------------
    def check(self) -> None:
        cam = urllib.parse.quote(self.camera_id, safe="")
        assignment = json.loads(self._get(f"/v1/cameras/{cam}/assignment", 1 << 20))
        target = assignment.get("model_id")
        current = self.rt.bundle.model_id
        if not target or target == current:
            self.report(current, "running")
            return
        if target in self.refused:
            self.report(target, "refused", self.refused[target])
            return
        if self.ready is not None and self.ready.bundle.model_id == target:
            return  # verified, waiting for the next frame
        log.warning("rollout: model %s assigned (%s); this camera runs %s: fetching it", target,
                    assignment.get("assigned_by"), current)
        self.report(target, "downloading")
        try:
            ready = self.prepare(target)
        except Refused as exc:
            reason = str(exc)
            self.refused[target] = reason
            log.error("event=rollout_refused camera=%s model=%s reason=%s; still running model %s", self.camera_id,
                      target, json.dumps(reason), current)
            self.report(target, "refused", reason)
            return
        self.ready = ready
        log.warning("rollout: model %s verified (signature, sha256 of every file, golden vectors); switching at the "
                    "next frame", target)

    def prepare(self, model_id: str) -> _Ready:
        """Download and verify ``model_id``; Refused with the reason when it must not run."""
        rt, cfg = self.rt, self.rt.config
        if cfg.temporal or cfg.budget_bps:
            raise Refused("this runtime cannot switch models over the air while temporal coding is on "
                          "(--temporal / --budget-bps); restart it with the new bundle")
        base = f"/v1/models/{urllib.parse.quote(model_id, safe='')}/files/"
        manifest_bytes = self._get(base + MANIFEST, 4 << 20)
        try:
            signature = self._get(base + SIGNATURE, 64 << 10)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            signature = None
        problem = check_signature(manifest_bytes, signature, self.keys)
        if problem is not None:
            raise Refused(problem)
        try:
            manifest = json.loads(manifest_bytes)
            spec = validate_manifest(manifest, "downloaded manifest")
        except (ValueError, BundleError) as exc:
            raise Refused(f"manifest: {exc}") from None
        if spec.model_id != model_id:
            raise Refused(f"the manifest is for model {spec.model_id}, the assignment names {model_id}")
        self.dir.mkdir(parents=True, exist_ok=True)
        dest = self.dir / model_id
        partial = self.dir / f".{model_id}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            for name in sorted(set(spec.files.values())):
                if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
                    raise Refused(f"the manifest names an unsafe file {name!r}")
                data = self._get(base + urllib.parse.quote(name, safe=""))
                digest = hashlib.sha256(data).hexdigest()
                if digest != spec.sha256.get(name):
                    raise Refused(f"{name}: sha256 {digest[:16]}... does not match the signed manifest's "
                                  f"{str(spec.sha256.get(name))[:16]}... (corrupt or tampered)")
                (partial / name).write_bytes(data)
            (partial / MANIFEST).write_bytes(manifest_bytes)
            if signature is not None:
                (partial / SIGNATURE).write_bytes(signature)
            try:
                bundle = load_bundle(partial)
                computed = compute_model_id(bundle.file("encoder"), bundle.file("tables"))
            except BundleError as exc:
                raise Refused(str(exc)) from None
            if computed != model_id:
                raise Refused(f"encoder and tables hash to model id {computed}, not {model_id}")
            problem = check_golden(bundle)
            if problem is not None:
                raise Refused(f"golden vectors on this device: {problem}")
            shutil.rmtree(dest, ignore_errors=True)
            partial.rename(dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        bundle = load_bundle(dest)
        from taskcodec.runtime.encoder import FrameEncoder
        from taskcodec.runtime.preprocess import Preprocessor

        try:
            preprocess = Preprocessor(bundle.input, cfg.roi)
            encoder = FrameEncoder(bundle, cfg.precision, cfg.threads, cfg.providers)
        except Exception as exc:  # noqa: BLE001 (EncoderError, PreprocessError, BundleError, ORT's own)
            raise Refused(f"cannot run it here: {exc}") from None
        encoder.stats = rt.encoder.stats  # one set of per-frame figures across the switch
        return _Ready(bundle, preprocess, encoder)

    # -- the switch (capture thread) -------------------------------------------------------------------------------
    def at_frame_boundary(self) -> None:
        """Called by the capture loop before each frame: switch to a verified model, if one is waiting."""
        ready, self.ready = self.ready, None
        if ready is None:
            return
        rt = self.rt
        old = rt.bundle.model_id
        rt.spool.set_model(ready.bundle.model_id)   # frames from here on are tagged with the new model
        rt.bundle, rt.preprocess, rt.encoder = ready.bundle, ready.preprocess, ready.encoder
        rt.uplink.model_tag = ready.bundle.model_tag
        tmp = self.dir / (CURRENT + ".tmp")
        tmp.write_text(ready.bundle.model_id + "\n")
        tmp.replace(self.dir / CURRENT)
        self.switches += 1
        log.warning("event=rollout_switched camera=%s from=%s to=%s at_seq=%d (earlier frames are still sent under "
                    "%s)", self.camera_id, old, ready.bundle.model_id, rt.spool.next_seq, old)
        self._wake.set()  # report "running" now rather than at the next poll
