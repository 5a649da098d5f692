"""Console auth: the API's rules over HTTP, and CSRF protection.

- With a bearer token configured (required off loopback, with TLS: api.server.check_bind), every
  page but the login form and the static assets needs a session cookie. The login form takes the
  token; the cookie holds an HMAC of it (never the token itself, which also opens the gRPC API):
  HttpOnly, SameSite=Strict, and Secure whenever the console is served over TLS.
- Every mutating request (POST) carries a CSRF token, in the ``X-CSRF-Token`` header or the
  ``csrf`` form field, equal to the one the page was rendered with: an HMAC of the session under
  a per-process secret. A request whose Origin is another site, or that the browser marks
  ``Sec-Fetch-Site: cross-site``, is refused before that. This also holds on loopback without a
  token: any web page the user visits could otherwise POST to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

SESSION_COOKIE = "syncplane_session"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC_PATHS = ("/login", "/static/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsoleAuth:
    def __init__(self, token: str | None, tls: bool) -> None:
        self.token, self.tls = token, tls
        self._csrf_secret = secrets.token_bytes(32)

    def session_value(self) -> str:
        assert self.token
        return hmac.new(self.token.encode(), b"syncplane-console-session", hashlib.sha256).hexdigest()

    def check_token(self, offered: str) -> bool:
        return bool(self.token) and hmac.compare_digest(offered.encode(), (self.token or "").encode())

    def signed_in(self, request: web.Request) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), self.session_value().encode())

    def csrf_token(self, request: web.Request) -> str:
        """The token a page rendered for this request's session embeds in its forms."""
        session = request.cookies.get(SESSION_COOKIE, "") if self.token else "anonymous"
        return hmac.new(self._csrf_secret, session.encode(), hashlib.sha256).hexdigest()

    def set_session(self, response: web.StreamResponse) -> None:
        response.set_cookie(SESSION_COOKIE, self.session_value(), httponly=True, secure=self.tls,
                            samesite="Strict", path="/")

    @staticmethod
    def cross_site(request: web.Request) -> bool:
        if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
            return True
        origin = request.headers.get("Origin")
        if origin is None:
            return False
        return origin != f"{request.scheme}://{request.host}"

    async def csrf_ok(self, request: web.Request) -> bool:
        if self.cross_site(request):
            return False
        offered = request.headers.get(CSRF_HEADER, "")
        if not offered and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            offered = str((await request.post()).get("csrf", ""))
        return bool(offered) and hmac.compare_digest(offered.encode(), self.csrf_token(request).encode())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS and not await self.csrf_ok(request):
            return refuse(request, 403, "PERMISSION_DENIED", "cross-site or CSRF-less request refused")
        if not request.path.startswith(PUBLIC_PATHS) and not self.signed_in(request):
            if request.method == "GET" and wants_html(request):
                raise web.HTTPSeeOther(f"/login?next={request.path_qs}")
            return refuse(request, 401, "UNAUTHENTICATED", "sign in with the server's token")
        return await handler(request)


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def refuse(request: web.Request, status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "reason": code, "fieldViolations": []},
                             status=status)
