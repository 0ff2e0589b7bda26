"""The `gmail` probe's token refresh: google-auth, synchronously, in a worker thread (probes/gmail.py says why).

A module of its own because google-auth and requests take ~100 ms to import: the gmail probe names this module in
its `libraries`, so it is imported off the event loop before the first run and never while a config is loaded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import google.auth.transport.requests
import requests
from google.auth import exceptions as google_exceptions
from google.oauth2.credentials import Credentials


class _TimeoutSession(requests.Session):
    """Every call gets this session's timeout: google-auth asks for 120 s, which would strand a thread."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.call_timeout = timeout
        self.last_status: int | None = None  # google-auth's RefreshError does not keep the status code

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["timeout"] = self.call_timeout
        response = super().request(*args, **kwargs)
        self.last_status = response.status_code
        return response


class Refused(Exception):
    """google-auth's RefreshError, with the status code of the token endpoint's last answer."""

    def __init__(self, error: google_exceptions.RefreshError, status: int | None) -> None:
        super().__init__(error, status)
        self.error = error
        self.status = status


def refresh(info: dict[str, str], token_uri: str, timeout: float) -> tuple[str, datetime | None]:
    """Runs in a worker thread: fresh credentials each run, so a late thread never shares state with the next run."""
    # from_authorized_user_info always sets Google's token URI (it ignores the file's), hence with_token_uri.
    credentials = Credentials.from_authorized_user_info(info).with_token_uri(token_uri)
    with _TimeoutSession(timeout) as session:
        try:
            credentials.refresh(google.auth.transport.requests.Request(session))
        except google_exceptions.RefreshError as exc:
            raise Refused(exc, session.last_status) from exc
    return credentials.token, credentials.expiry
