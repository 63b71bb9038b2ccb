"""The dashboard behind the admin API's credentials: any valid token or OIDC JWT (every role
includes ``viewer``, the role that reads tasks, rounds and models) opens it.

A request carries the credential as ``Authorization: Bearer <token>`` (scripts), or as the
``fedcoord_token`` cookie a browser gets from the login form (``POST /login``: HttpOnly,
SameSite=Strict, so other sites' pages cannot send it, and the page's script cannot read
it). Without one, a page request is sent to ``/login``; anything else gets 401. Static files
and the login form itself need none. The credential is checked on every request, so a
revoked token stops working at once.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.security.errors import SecurityError

#: ``authenticate("Bearer <token>")`` returns the principal or raises a SecurityError.
Authenticate = Callable[[str | None], object]

COOKIE = "fedcoord_token"
#: Paths (inside the dashboard) open without a credential.
_OPEN = ("/login", "/static/")
#: The largest login form read (a token or a JWT).
_MAX_FORM_BYTES = 16 << 10


class ViewerAuth:
    """ASGI middleware around the dashboard app."""

    def __init__(self, app: ASGIApp, authenticate: Authenticate) -> None:
        self._app = app
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request = Request(scope, receive)
        path = _inner_path(scope)
        if path == "/login":
            response = await _login(request, self._authenticate)
            await response(scope, receive, send)
            return
        if path.startswith(_OPEN) or self._allowed(request):
            await self._app(scope, receive, send)
            return
        response = _refusal(request, path)
        await response(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        header = request.headers.get("authorization")
        if header is None and COOKIE in request.cookies:
            header = f"Bearer {request.cookies[COOKIE]}"
        if header is None:
            return False
        try:
            self._authenticate(header)
        except SecurityError:
            return False
        return True


def _inner_path(scope: Scope) -> str:
    """The path inside the mount (starlette keeps the full path and sets root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _refusal(request: Request, path: str) -> Response:
    wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
    if wants_page:
        return RedirectResponse(f"{_root(request)}/login?next={quote(path)}", status_code=303)
    return PlainTextResponse("this dashboard needs credentials: 'Authorization: Bearer <token>' "
                             "(any fedctl token; viewer is enough)", status_code=401,
                             headers={"WWW-Authenticate": "Bearer"})


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _safe_next(value: str) -> str:
    """Only a path of this site (no scheme, no ``//host``): no open redirect."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


async def _login(request: Request,
                 authenticate: Callable[[str | None], object]) -> Response:
    if request.method == "GET":
        return _login_page(_safe_next(request.query_params.get("next", "/")), "")
    if request.method != "POST":
        return PlainTextResponse("use GET or POST", status_code=405)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return PlainTextResponse("login form too large", status_code=413)
    form = parse_qs(body.decode("utf-8", "replace"))
    token = form.get("token", [""])[0].strip()
    target = _safe_next(form.get("next", ["/"])[0])
    try:
        authenticate(f"Bearer {token}")
    except SecurityError as exc:
        return _login_page(target, str(exc), status=401)
    response = RedirectResponse(f"{_root(request)}{target}", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                        path=_root(request) or "/")
    return response


def _login_page(target: str, error: str, status: int = 200) -> HTMLResponse:
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedcoord: log in</title>"
        "<link rel='stylesheet' href='static/dashboard.css'></head><body><main>"
        "<h1>fedcoord dashboard</h1>"
        "<p>Log in with a fedctl token (<code>fedctl tokens create --role viewer</code>) "
        "or an OIDC token of this coordinator's issuer.</p>"
        f"{message}<form method='post' action='login'>"
        f"<input type='hidden' name='next' value='{html.escape(target, quote=True)}'>"
        "<label>Token <input type='password' name='token' autocomplete='off' required>"
        "</label> <button type='submit'>Log in</button></form></main></body></html>")
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

