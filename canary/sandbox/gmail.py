"""Gmail around the platform: the platform's `POST /gmail/setup-watch`, and stand-ins for Google's OAuth token
endpoint (`POST /google/token`) and Gmail's `users.getProfile` (`GET /google/gmail/v1/users/me/profile`).

They speak Google's wire formats (form-encoded refresh grant, OAuth error JSON, Gmail's error envelope with
`WWW-Authenticate`), so google-auth and a plain HTTP client work against them unchanged. Only the fake
credentials in deploy/sandbox/gmail-authorized-user.json are accepted, and the profile answers only bearer
tokens this stand-in issued. `GET /_sandbox/gmail` shows what was issued and how often the watch was renewed.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from canary.sandbox.faults import FAULTS, HANG_SECONDS

# The fake OAuth client and refresh token of deploy/sandbox/gmail-authorized-user.json; nothing else is accepted.
CLIENT_ID = "000000000000-canarysandbox.apps.googleusercontent.com"
CLIENT_SECRET = "SANDBOX-fake-client-secret-not-real"
REFRESH_TOKEN = "1//SANDBOX-fake-refresh-token-not-real"
EMAIL_ADDRESS = "support@sandbox.example"
SCOPE = "https://www.googleapis.com/auth/gmail.modify"
TOKEN_LIFETIME = 3599
WATCH_LIFETIME = 7 * 86400.0
EXPIRING_WATCH_LIFETIME = 3600.0

FAULT_DEFAULTS: dict[str, Any] = {"gmail_oauth": "ok", "gmail_api": "ok", "gmail_watch": "ok"}
FAULT_CHOICES = {
    "gmail_oauth": ("ok", "revoked", "invalid_client", "error", "hang"),
    "gmail_api": ("ok", "unauthorized", "error", "hang"),
    "gmail_watch": ("ok", "expiring", "error", "hang"),
}

_GOOGLE_JSON = "application/json"
_NO_STORE = {"Cache-Control": "no-cache, no-store, max-age=0, must-revalidate", "Pragma": "no-cache"}
_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'}
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid "
    "authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


@dataclass
class GmailState:
    """What the stand-ins issued and saw, for tests and for `GET /_sandbox/gmail`."""

    issued: dict[str, float] = field(default_factory=dict)  # access token -> expiry (Unix seconds)
    token_requests: int = 0
    last_token_expiry: float | None = None
    profile_requests: int = 0
    watch_calls: list[dict[str, Any]] = field(default_factory=list)
    history_ids: Any = field(default_factory=lambda: itertools.count(184_467))

    def issue_token(self) -> tuple[str, float]:
        now = time.time()
        self.issued = {token: expiry for token, expiry in self.issued.items() if expiry > now}  # stays small
        token = "ya29.sandbox-" + secrets.token_urlsafe(32)
        expiry = now + TOKEN_LIFETIME
        self.issued[token] = expiry
        self.last_token_expiry = expiry
        return token, expiry

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_requests": self.token_requests,
            "last_token_expiry": self.last_token_expiry,
            "live_access_tokens": len(self.issued),
            "profile_requests": self.profile_requests,
            "watch_calls": list(self.watch_calls),
        }


GMAIL = web.AppKey("gmail_state", GmailState)


def add_routes(app: web.Application) -> None:
    app[GMAIL] = GmailState()
    app.router.add_post("/google/token", _token)
    app.router.add_get("/google/gmail/v1/users/{user_id}/profile", _profile)
    app.router.add_post("/gmail/setup-watch", _setup_watch)
    app.router.add_get("/_sandbox/gmail", _state)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status, headers=_NO_STORE)


async def _token(request: web.Request) -> web.Response:
    """Google's refresh grant: client checked first (401 invalid_client), then the refresh token (400 invalid_grant)."""
    state, mode = request.app[GMAIL], request.app[FAULTS]["gmail_oauth"]
    state.token_requests += 1
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "error":
        return _oauth_error(503, "temporarily_unavailable", "The service is currently unavailable.")
    form = await request.post()
    grant_type = form.get("grant_type")
    if grant_type != "refresh_token":
        return _oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type or ''}")
    for name in ("client_id", "refresh_token"):
        if not form.get(name):
            return _oauth_error(400, "invalid_request", f"Missing required parameter: {name}")
    if form.get("client_id") != CLIENT_ID:
        return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
    if mode == "invalid_client" or form.get("client_secret") != CLIENT_SECRET:
        return _oauth_error(401, "invalid_client", "Unauthorized")
    if mode == "revoked":
        return _oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
    if form.get("refresh_token") != REFRESH_TOKEN:
        return _oauth_error(400, "invalid_grant", "Bad Request")
    token, _ = state.issue_token()
    return web.json_response(
        {"access_token": token, "expires_in": TOKEN_LIFETIME, "scope": SCOPE, "token_type": "Bearer"}, headers=_NO_STORE
    )


def _gmail_error(status: int, status_name: str, message: str, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    """Google APIs' error envelope."""
    body = {"error": {"code": status, "message": message, "errors": [{"message": message, "domain": "global", "reason": reason}],
                      "status": status_name}}
    return web.json_response(body, status=status, headers=headers, content_type=_GOOGLE_JSON)


async def _profile(request: web.Request) -> web.Response:
    state, mode = request.app[GMAIL], request.app[FAULTS]["gmail_api"]
    state.profile_requests += 1
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "error":
        return _gmail_error(500, "INTERNAL", "Internal error encountered.", "backendError")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expiry = state.issued.get(token) if scheme.lower() == "bearer" else None
    if mode == "unauthorized" or expiry is None or expiry <= time.time():
        return _gmail_error(401, "UNAUTHENTICATED", _UNAUTHENTICATED, "authError", _INVALID_TOKEN)
    if request.match_info["user_id"] not in ("me", EMAIL_ADDRESS):
        return _gmail_error(403, "PERMISSION_DENIED", f"Delegation denied for {EMAIL_ADDRESS}", "forbidden")
    history_id = str(next(state.history_ids))
    return web.json_response(
        {"emailAddress": EMAIL_ADDRESS, "messagesTotal": 1843, "threadsTotal": 1207, "historyId": history_id}
    )


async def _setup_watch(request: web.Request) -> web.Response:
    """The platform's renewal: it calls Gmail's users.watch and passes on its historyId and expiration (epoch ms)."""
    state, mode = request.app[GMAIL], request.app[FAULTS]["gmail_watch"]
    call: dict[str, Any] = {"synthetic": request.headers.get("X-Synthetic-Canary") == "1", "expiration": None}
    state.watch_calls.append(call)
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "error":
        return web.json_response({"detail": "Internal Server Error"}, status=500)
    lifetime = EXPIRING_WATCH_LIFETIME if mode == "expiring" else WATCH_LIFETIME
    expiration = str(int((time.time() + lifetime) * 1000))
    call["expiration"] = expiration
    return web.json_response({"historyId": str(next(state.history_ids)), "expiration": expiration})


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[GMAIL].as_dict())
