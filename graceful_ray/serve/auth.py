"""Bearer-token check for the admin routes.

The router holds only the sha256 of the token (from the config, or hashed at
start-up from an environment variable), compares digests in constant time, and
never logs either: a token that leaks through logs is a token anyone can use to
force a cutover.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from graceful_ray.serve.shadow_config import ShadowConfig

log = logging.getLogger(__name__)


class AdminAuth:
    """Checks ``Authorization: Bearer <token>`` headers."""

    def __init__(self, token_sha256: str | None) -> None:
        self._digest = bytes.fromhex(token_sha256) if token_sha256 else None

    @classmethod
    def from_config(cls, config: ShadowConfig) -> "AdminAuth":
        digest = config.admin_token_sha256
        if digest is None:
            token = os.environ.get(config.admin_token_env, "")
            digest = hashlib.sha256(token.encode()).hexdigest() if token.strip() else None
        if digest is None:
            log.warning("no admin token configured (set $%s or admin_token_sha256): admin "
                        "routes refuse every request", config.admin_token_env)
        return cls(digest)

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> str | None:
        """``None`` when allowed, else the reason to answer 401 with."""
        if self._digest is None:
            return ("admin routes are disabled: the server has no admin token configured "
                    "(set it in the environment variable named by admin_token_env)")
        if not authorization:
            return "missing 'Authorization: Bearer <token>' header"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the Authorization header must be 'Bearer <token>'"
        given = hashlib.sha256(token.strip().encode()).digest()
        if not hmac.compare_digest(given, self._digest):
            return "invalid admin token"
        return None
