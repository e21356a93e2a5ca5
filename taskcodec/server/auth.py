"""Camera tokens and operator API keys: issued once, stored only as a salted hash, checked in constant time.

Tokens are 32 random bytes (256 bits, url-safe base64), so a stolen hash cannot be brute-forced whatever the hash's
speed; a slow KDF like scrypt protects *low-entropy passwords* and would only add milliseconds to every HTTP ingest
request. So we store ``sha256$<salt hex>$<sha256(salt || token) hex>`` with a random per-camera salt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time

from fastapi import HTTPException, Request

from taskcodec.server.storage import Camera, Operator, Storage

SCHEME = "sha256"
CAMERA_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Checked against when the camera is unknown, so an unknown id costs the same time as a wrong token.
_DUMMY = f"{SCHEME}${'00' * 16}${'00' * 32}"


class AuthError(ValueError):
    """A camera id or token that cannot be used."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: bytes, salt: bytes | None = None) -> str:
    salt = secrets.token_bytes(16) if salt is None else salt
    return f"{SCHEME}${salt.hex()}${hashlib.sha256(salt + token).hexdigest()}"


def verify_token(token: bytes, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return False
    if scheme != SCHEME:
        return False
    return hmac.compare_digest(hashlib.sha256(salt + token).digest(), digest)


def check_camera_id(camera_id: str) -> str:
    if not CAMERA_ID.match(camera_id):
        raise AuthError(f"camera id {camera_id!r} must be 1-128 characters from A-Z a-z 0-9 . _ : -")
    return camera_id


def add_camera(storage: Storage, camera_id: str) -> str:
    """Register a camera; returns its token (shown once, never stored in clear)."""
    check_camera_id(camera_id)
    token = new_token()
    storage.add_camera(camera_id, hash_token(token.encode()))
    return token


def authenticate(storage: Storage, camera_id: str, token: bytes) -> bool:
    return authenticate_camera(storage, camera_id, token) is not None


def authenticate_camera(storage: Storage, camera_id: str, token: bytes) -> Camera | None:
    """The camera if ``token`` is its current token (constant time whether or not the camera exists), else None."""
    camera = storage.get_camera(camera_id)
    ok = verify_token(token, camera.token_hash if camera else _DUMMY)
    return camera if ok and camera is not None else None


def rotate_camera(storage: Storage, camera_id: str) -> str:
    """Give a camera a new token (returned once); the old one stops working, live sessions end within seconds."""
    token = new_token()
    if not storage.set_token_hash(camera_id, hash_token(token.encode())):
        raise AuthError(f"no camera {camera_id!r}")
    return token


# Operators ---------------------------------------------------------------------------------------------------------
# People and tools that read or administer the server (dashboard, query API, heads, Prometheus) use API keys sent as
# ``Authorization: Bearer <key>``. A key is ``tco_`` + 32 random bytes; the DB keeps only its SHA-256 (unsalted is
# safe for 256-bit random secrets and lets the key be looked up by its hash, so a request costs one indexed SELECT).
# Scopes are ordered: an "admin" key may do what a "read" key may, a "read" key what a "metrics" (scrape) key may.

SCOPES = ("metrics", "read", "admin")
OPERATOR_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
KEY_PREFIX = "tco_"


def new_operator_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_operator_key(key: str) -> str:
    return "sha256$" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise AuthError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    return scope


def scope_allows(granted: str, needed: str) -> bool:
    return SCOPES.index(granted) >= SCOPES.index(needed) if granted in SCOPES else False


def add_operator(storage: Storage, name: str, scope: str) -> str:
    """Create an operator API key; returns it (shown once, only its hash is stored)."""
    if not OPERATOR_NAME.match(name):
        raise AuthError(f"operator name {name!r} must be 1-64 characters from A-Z a-z 0-9 . _ : @ -")
    check_scope(scope)
    key = new_operator_key()
    storage.add_operator(name, hash_operator_key(key), scope)
    return key


def authenticate_operator(storage: Storage, key: str) -> Operator | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    return storage.operator_by_key_hash(hash_operator_key(key))


class RateLimitedLog:
    """At most one log line per ``key`` every ``interval`` seconds, with the count of the suppressed ones."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 10000):
        self.logger, self.interval, self.max_keys = logger, interval, max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        self.logger.warning(message + (f" ({suppressed} more like it suppressed)" if suppressed else ""))


log = logging.getLogger("taskcodec.server.auth")
failed_logins = RateLimitedLog(log)


def unauthorized(request: Request, who: str, rate_key: str, why: str, detail: str, realm: str) -> HTTPException:
    """Log (rate-limited) and count a failed ``who`` ("operator" or "camera") authentication; the HTTP 401 to raise."""
    address = request.client.host if request.client else "?"
    failed_logins.warning(rate_key, f"{who} authentication failed from {address} for {request.method} "
                                    f"{request.url.path}: {why}")
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.auth_failures.labels(who).inc()
    return HTTPException(401, detail, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


def require_operator(scope: str):
    """FastAPI dependency: the Operator behind ``Authorization: Bearer KEY`` if its scope covers ``scope``; 401
    without (valid) credentials, 403 with too small a scope. The app must set ``app.state.storage``.

        @app.get("/v1/thing", dependencies=[Depends(require_operator("read"))])
        def thing(...): ...
        # or: def thing(op: Operator = Depends(require_operator("admin"))): ...
    """
    check_scope(scope)

    def dependency(request: Request) -> Operator:
        header = request.headers.get("authorization", "")
        kind, _, key = header.partition(" ")
        address = request.client.host if request.client else "?"
        operator = authenticate_operator(request.app.state.storage, key.strip()) if kind.lower() == "bearer" else None
        if operator is None:
            raise unauthorized(request, "operator", f"op:{address}",
                               f"{'bad' if header else 'no'} credentials",
                               "operator API key required (Authorization: Bearer KEY)", "taskcodec")
        if not scope_allows(operator.scope, scope):
            raise HTTPException(403, f"operator {operator.name!r} has scope {operator.scope!r}; this needs {scope!r}")
        return operator

    return dependency
