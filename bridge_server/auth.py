"""Who may talk to the bridge: the token, browsers (Origin) and DNS rebinding (Host).

- Token: when the bridge has one, every request (websocket handshakes included) must carry
  ``Authorization: Bearer <token>``. Both sides are hashed to a fixed length and compared with
  `hmac.compare_digest`, so the check takes the same time whatever the guess.
- Origin: browsers add an ``Origin`` header to cross-site requests (and to every websocket);
  the plugin and scripts send none. A request with an Origin that was not allowed with
  ``--allow-origin`` is refused, so a web page cannot drive the bridge. No CORS headers are sent.
- Host: without a token, a loopback bridge only answers requests addressed to a loopback name,
  so a DNS-rebinding page (same-origin, no Origin header) cannot read it either.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from .config import BridgeConfig, is_loopback
from .handlers import error_response

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(supplied: str | None, expected_digest: bytes) -> bool:
    """Constant-time check of an ``Authorization`` header value against the token's digest."""
    scheme, _, value = (supplied or "").partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    ok_value = hmac.compare_digest(_digest(value.strip()), expected_digest)
    return ok_scheme & ok_value


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:7870
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def security_middleware(config: BridgeConfig):
    expected = _digest(config.token) if config.token else None
    check_host = expected is None and is_loopback(config.host)
    origins = set(config.allowed_origins)

    @web.middleware
    async def security(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if origin is not None and origin not in origins:
            return error_response(
                403,
                f"Origin: {origin!r} is not allowed (browsers cannot call this bridge unless started with --allow-origin)",
            )
        if check_host and _host_name(request.host or "").lower() not in LOCAL_HOSTS:
            return error_response(
                403, f"Host: {request.host!r} is not this machine (use 127.0.0.1 or localhost)"
            )
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin is not None else {}
        if origin is not None and request.method == "OPTIONS":  # an allowed origin's preflight
            return web.Response(
                status=204,
                headers={
                    **cors,
                    "Access-Control-Allow-Methods": "GET, POST, DELETE",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )
        if expected is not None and not token_matches(request.headers.get("Authorization"), expected):
            return error_response(
                401,
                "Authorization: missing or wrong token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": 'Bearer realm="collage-bridge"', **cors},
            )
        response = await handler(request)
        if cors and not response.prepared:
            response.headers.update(cors)
        return response

    return security
