"""Who may talk to the UI: on a loopback host anyone on this machine; on any other host only requests that carry
the token (``Authorization: Bearer T``, a ``?token=T`` query, or the cookie the query sets). Everything else gets
401 before Gradio sees it."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "FLUX_LORA_UI_TOKEN"
COOKIE = "flux_lora_ui_token"


def host_token(host: str, token: str | None) -> tuple[str | None, str | None]:
    """``(token to require, refusal)``: the token given (or ``FLUX_LORA_UI_TOKEN``); a refusal line when ``host``
    is not loopback and there is none."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK and not token:
        return None, (
            f"--host {host} makes the UI reachable from other machines: give --token or set {TOKEN_ENV} "
            "(or keep the default --host 127.0.0.1)"
        )
    return token, None


def authorized(token: str, headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
    """Whether a request carries ``token`` (compared in constant time)."""
    auth = headers.get("authorization", "")
    given = [auth[7:] if auth.lower().startswith("bearer ") else "", query.get("token", ""), cookies.get(COOKIE, "")]
    return any(g and hmac.compare_digest(g.encode(), token.encode()) for g in given)


def token_middleware(token: str) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """A Starlette HTTP middleware refusing (401) every request without ``token``; a valid ``?token=`` sets the
    cookie so the page's own requests carry it."""

    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not authorized(token, request.headers, request.query_params, request.cookies):
            return PlainTextResponse("401: this UI needs its token (?token=... or Authorization: Bearer)", 401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return check
