"""Camera tokens: issued once, stored only as a salted hash, checked in constant time.

Tokens are 32 random bytes (256 bits, url-safe base64), so a stolen hash cannot be brute-forced whatever the hash's
speed; a slow KDF like scrypt protects *low-entropy passwords* and would only add milliseconds to every HTTP ingest
request. So we store ``sha256$<salt hex>$<sha256(salt || token) hex>`` with a random per-camera salt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from taskcodec.server.storage import Storage

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
    camera = storage.get_camera(camera_id)
    ok = verify_token(token, camera.token_hash if camera else _DUMMY)
    return ok and camera is not None
