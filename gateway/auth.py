"""Caller and admin keys. Keys are compared by SHA-256 digest (caller) or in constant time
(admin); only key ids ever leave this module."""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import AuthSettings

ANONYMOUS = "anonymous"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._callers = {_digest(key.get_secret_value()): key_id for key_id, key in settings.api_keys.items()}
        self._admin = _digest(settings.admin_key.get_secret_value()) if settings.admin_key else None
        self.open = not self._callers

    def caller(self, authorization: str | None) -> str:
        """The key id of the caller; raises Unauthorized. Open gateways (no keys) admit everyone."""
        token = bearer_token(authorization)
        if token is not None:
            digest = _digest(token)
            key_id = self._callers.get(digest)
            if key_id is not None:
                return key_id
            if self._admin is not None and hmac.compare_digest(digest, self._admin):
                return "admin"
        if self.open:
            return ANONYMOUS
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        raise Unauthorized("invalid API key")

    def admin(self, authorization: str | None) -> None:
        if self._admin is None:
            raise Forbidden("admin operations are disabled: set auth.admin_key", code="admin_disabled")
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("admin key required", code="missing_api_key")
        if not hmac.compare_digest(_digest(token), self._admin):
            raise Unauthorized("invalid admin key")
