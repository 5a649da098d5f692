"""Console auth: the API's rules over HTTP, and CSRF protection.

- Every page is one RPC of the API (:data:`ROUTES`), checked and audited by the same
  :class:`~syncplane.api.callers.Call` as over gRPC: the caller is authenticated from a bearer token,
  authorised for the RPC's verb on the workflow, and every mutating request writes its audit line.
- Shared token (embedded, or ``--auth token``; required off loopback, with TLS: api.server.check_bind):
  every page but the login form and the static assets needs a session cookie. The login form takes
  the token; the cookie holds an HMAC of it (never the token itself, which also opens the gRPC API).
- Kubernetes callers (``--auth kubernetes``): each user signs in with their own Kubernetes token
  (``kubectl create token``, an OIDC id token), checked with a TokenReview at sign-in and on every
  request, each page authorised by a SubjectAccessReview, so the console allows what ``kubectl``
  allows. The cookie holds that token (the server keeps no session: any replica serves the next
  request), as the Kubernetes Dashboard does; a script may send ``Authorization: Bearer`` instead.
- Cookies are HttpOnly, SameSite=Strict, and Secure whenever the console is served over TLS.
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

from syncplane import errors
from syncplane.api.callers import Call, Callers, SharedToken

SESSION_COOKIE = "syncplane_session"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC_PATHS = ("/login", "/logout", "/static/")   # logging out needs no token (CSRF still does)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: (method, route) -> the RPC it is (its verb: callers.VERBS). A route missing here is refused (403).
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/"): "ListWorkflows",
    ("GET", "/api/workflows"): "ListWorkflows",
    ("GET", "/events"): "WatchWorkflows",
    ("GET", "/new"): "CreateWorkflow",
    ("POST", "/new"): "CreateWorkflow",
    ("GET", "/workflows/{id}"): "GetWorkflow",
    ("GET", "/api/workflows/{id}"): "GetWorkflow",
    ("GET", "/workflows/{id}/edit"): "GetWorkflow",
    ("POST", "/workflows/{id}/edit"): "UpdateWorkflow",
    ("POST", "/workflows/{id}/delete"): "DeleteWorkflow",
    ("POST", "/workflows/{id}/replay"): "UpdateWorkflow",
    ("GET", "/workflows/{id}/deadletters"): "ListDeadLetters",
    ("POST", "/workflows/{id}/deadletters/retry"): "RetryDeadLetters",
    ("POST", "/workflows/{id}/start"): "StartWorkflow",
    ("POST", "/workflows/{id}/stop"): "StopWorkflow",
    ("POST", "/workflows/{id}/restart"): "RestartWorkflow",
}
#: request key: the google.rpc code name of a handled call's outcome (set by the pages; default from the HTTP status)
RESULT: web.RequestKey[str] = web.RequestKey("result", str)


class ConsoleAuth:
    """``token``: the shared token (None: none); ``callers``: the server's own callers when each caller
    brings their own token (the Kubernetes backend's TokenReview/SubjectAccessReview), else None."""

    def __init__(self, token: str | None, tls: bool, callers: Callers | None = None,
                 shared_secret: bytes = b"") -> None:
        self.token, self.tls = token, tls
        self.own_tokens = callers is not None
        self.callers: Callers = callers or SharedToken(token)
        # The CSRF tokens' key. Server replicas behind one Service must agree on it (a page from one
        # replica posts to another): derived from a secret they share (the TLS key, else the shared
        # token) when there is one, else random per process (loopback, one process).
        material = shared_secret or (token or "").encode()
        self._csrf_secret = (hmac.new(material, b"syncplane-console-csrf", hashlib.sha256).digest() if material
                             else secrets.token_bytes(32))

    @property
    def sign_in(self) -> bool:
        """Whether pages need a signed-in session (a token to check)."""
        return self.own_tokens or bool(self.token)

    def session_value(self) -> str:
        assert self.token
        return hmac.new(self.token.encode(), b"syncplane-console-session", hashlib.sha256).hexdigest()

    def token_of(self, request: web.Request) -> str | None:
        """The bearer token a request carries: its Authorization header, else its session cookie."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return value
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if self.own_tokens:
            return cookie or None
        if self.token and hmac.compare_digest(cookie.encode(), self.session_value().encode()):
            return self.token
        return None

    async def check_token(self, offered: str) -> bool:
        """At sign-in: whether ``offered`` authenticates (the shared token, or a TokenReview)."""
        try:
            await self.callers.authenticate(offered)
        except errors.Unauthenticated:
            return False
        return True

    def csrf_token(self, request: web.Request) -> str:
        """The token a page rendered for this request's session embeds in its forms."""
        session = request.cookies.get(SESSION_COOKIE, "") if self.sign_in else "anonymous"
        return hmac.new(self._csrf_secret, session.encode(), hashlib.sha256).hexdigest()

    def set_session(self, response: web.StreamResponse, token: str) -> None:
        value = token if self.own_tokens else self.session_value()
        response.set_cookie(SESSION_COOKIE, value, httponly=True, secure=self.tls, samesite="Strict", path="/")

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
        if request.path.startswith(PUBLIC_PATHS):
            return await handler(request)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else ""
        name = ROUTES.get(("GET" if request.method == "HEAD" else request.method, canonical))
        if resource is not None and name is None:   # a page nobody mapped to an RPC: fail closed
            return refuse(request, 403, "PERMISSION_DENIED", f"{request.method} {canonical} is not allowed")
        call = Call(self.callers, name or "", request.match_info.get("id"))
        try:
            await call.check(self.token_of(request))
        except errors.Unauthenticated:
            call.done("UNAUTHENTICATED")
            if request.method == "GET" and wants_html(request):
                raise web.HTTPSeeOther(f"/login?next={request.path_qs}") from None
            message = "sign in with your Kubernetes token" if self.own_tokens else "sign in with the server's token"
            return refuse(request, 401, "UNAUTHENTICATED", message)
        except errors.PermissionDenied as exc:
            call.done("PERMISSION_DENIED")
            return refuse(request, 403, "PERMISSION_DENIED", str(exc))
        try:
            response = await handler(request)
        except web.HTTPException as exc:   # a form post answered with a redirect, or an HTTP error
            call.done(request.get(RESULT) or ("OK" if exc.status < 400 else f"HTTP_{exc.status}"))
            raise
        call.done(request.get(RESULT) or ("OK" if response.status < 400 else f"HTTP_{response.status}"))
        return response


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def refuse(request: web.Request, status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "reason": code, "fieldViolations": []},
                             status=status)
