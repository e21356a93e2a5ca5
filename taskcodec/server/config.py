"""Typed server configuration: `taskcodec serve --config server.yaml` and/or flags (flags win). An unknown or mistyped
key is refused with its name. Secrets never come from here or from flags: the TLS key's password is read from the
environment (``TASKCODEC_TLS_KEY_PASSWORD``) or from a file named by ``tls.key_password_file``.

    # server.yaml
    bundle: /opt/taskcodec/bundle
    db: /var/lib/taskcodec/server.db
    host: 0.0.0.0
    port: 8443
    tls: {cert: /etc/taskcodec/server.crt, key: /etc/taskcodec/server.key}
    limits: {max_pending_per_address: 16, handshake_timeout_s: 10}
    storage: {integrity_check_interval_s: 600}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from taskcodec import wire


class ConfigError(ValueError):
    """A configuration that cannot be used (the message names the key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    cert: Path = Field(description="PEM certificate chain (server certificate first)")
    key: Path = Field(description="PEM private key")
    key_password_file: Optional[Path] = Field(None, description="file holding the key's password (else the "
                                              "TASKCODEC_TLS_KEY_PASSWORD environment variable, else none)")

    def key_password(self) -> str | None:
        if self.key_password_file is not None:
            return self.key_password_file.read_text().strip()
        return os.environ.get("TASKCODEC_TLS_KEY_PASSWORD") or None


class Limits(_Strict):
    """What a peer may cost the server before and after it has authenticated."""
    max_hello_bytes: int = Field(1024, ge=wire.MAX_HELLO_BYTES, le=65536, description="largest first WebSocket "
                                 "message (HELLO); a longer one closes the connection unread (1009)")
    max_message_bytes: int = Field(64 << 20, ge=1024, description="largest message after authentication")
    max_http_body_bytes: int = Field(16 << 20, ge=1024, description="largest POST /v1/ingest body (read only "
                                     "after its HELLO authenticated)")
    handshake_timeout_s: float = Field(10.0, gt=0, description="HELLO must arrive within this after the upgrade")
    http_header_timeout_s: float = Field(10.0, gt=0, description="request line + headers must arrive within this")
    http_body_timeout_s: float = Field(30.0, gt=0, description="a POST body must arrive within this")
    keep_alive_s: int = Field(5, ge=1, description="idle HTTP keep-alive connections are closed after this")
    max_pending_per_address: int = Field(16, ge=1, description="unauthenticated WebSocket connections per peer "
                                         "address (more are refused before the upgrade)")
    max_pending: int = Field(256, ge=1, description="unauthenticated WebSocket connections in total")
    max_connections: int = Field(10000, ge=16, description="open connections in total (uvicorn "
                                 "limit_concurrency)")
    revocation_check_s: float = Field(2.0, gt=0, description="an idle session re-checks its camera's token this "
                                      "often (every batch is checked in its own transaction anyway)")


class StorageConfig(_Strict):
    integrity_check_at_start: bool = Field(True, description="PRAGMA quick_check before serving; refuse to start "
                                           "on a damaged database")
    integrity_check_interval_s: float = Field(600.0, ge=0, description="re-run quick_check this often for "
                                              "/healthz (0: never)")
    checkpoint_interval_s: float = Field(30.0, gt=0, description="TRUNCATE checkpoint of the WAL this often")
    wal_autocheckpoint_pages: int = Field(4096, ge=16, description="SQLite's PASSIVE checkpoint threshold")
    journal_size_limit_bytes: int = Field(32 << 20, ge=0, description="WAL file truncated to this after a "
                                          "checkpoint")
    busy_retry_after_s: float = Field(5.0, gt=0, description="retry hint sent with BUSY while storage is full")
    full_probe_interval_s: float = Field(2.0, gt=0, description="while full, try a small write this often")
    compact: bool = Field(True, description="pack closed camera-hours into blocks in a background thread")
    compact_interval_s: float = Field(300.0, gt=0, description="background compaction looks this often")
    compact_settle_s: float = Field(600.0, description="pack only hours that closed at least this long ago (late "
                                    "frames after that still land as rows and join their block next time)")


class ServerConfig(_Strict):
    bundle: Optional[Path] = Field(None, description="model bundle folder (default: the embedded one)")
    db: Path = Field(Path("taskcodec-server.db"), description="SQLite database file (created 0600 if missing)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    port_file: Optional[Path] = None
    microbatch: bool = True
    microbatch_linger_ms: float = Field(50.0, ge=0, le=1000, description="under load, wait up to this long for "
                                        "more messages before a micro-batch (fewer commits per frame); 0: never")
    microbatch_linger_frames: int = Field(256, ge=1, description="... or until this many frames wait")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "warning"
    ws_ping_interval: float = Field(120.0, ge=0)
    tls: Optional[TLSConfig] = None
    limits: Limits = Limits()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _tls_files(self) -> "ServerConfig":
        if self.tls is not None:
            for name in ("cert", "key"):
                if not getattr(self.tls, name).is_file():
                    raise ValueError(f"tls.{name}: no file {getattr(self.tls, name)}")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def _describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def build_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """The YAML file's settings (if any) with ``overrides`` (flags actually given; dotted keys like
    ``tls.cert`` allowed) on top. Raises ConfigError naming the offending key."""
    data: dict[str, Any] = {}
    if file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: expected a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{p}: expected a mapping")
        node[leaf] = value
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid server configuration{f' in {file}' if file else ''}: {_describe(exc)}") from exc
