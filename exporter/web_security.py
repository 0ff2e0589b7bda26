"""The web config in force: the listener's TLS context, and the guard that asks for basic auth and adds headers.

A reload swaps the whole web config at once. Passwords and headers apply from the next request; certificates and
client CAs from the next TLS handshake, because the listening context's SNI callback (which OpenSSL calls for every
handshake, with or without SNI) hands each new connection the context of the config in force. Versions and the
client-certificate policy are copied by OpenSSL from the listening context when a connection starts, so a reload
sets those on it. Connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Collection

from aiohttp import web

from canary.config import ConfigError
from exporter.basic_auth import basic_credentials

if TYPE_CHECKING:  # exporter.web_config (YAML, cryptography: ~40 ms) is imported only when a web config file is given
    from exporter.web_config import WebConfig

log = logging.getLogger("canary.web")

REALM = "channel-canary"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebSecurity:
    """Holds the web config in force; `load` then `apply` is a reload, so a daemon can reload it with its own."""

    def __init__(self, config: WebConfig | None) -> None:
        self._config = config
        # The listening socket's context: the first config's, which then hands each handshake to the config in
        # force. None: plain HTTP.
        self.ssl_context = config.ssl_context if config is not None else None
        if self.ssl_context is not None:
            self.ssl_context.sni_callback = self._hand_over

    @classmethod
    def from_file(cls, path: Path | str | None) -> WebSecurity:
        """No file: no TLS, no auth, no headers. Raises ConfigError for a bad file."""
        if path is None:
            return cls(None)
        from exporter.web_config import load_web_config

        return cls(load_web_config(path))

    @property
    def scheme(self) -> str:
        return "http" if self.ssl_context is None else "https"

    def load(self) -> WebConfig | None:
        """Re-read the file for a reload, refusing what needs a restart; changes nothing. Raises ConfigError."""
        if self._config is None:
            return None
        from exporter.web_config import load_web_config

        config = load_web_config(self._config.path)
        running, wanted = self._config.tls, config.tls
        if (running is None) != (wanted is None):
            raise ConfigError(config.path, ["tls_server_config: switching TLS on or off takes a restart"])
        if running is not None and wanted is not None and running.legacy != wanted.legacy:
            raise ConfigError(
                config.path,
                ["tls_server_config.min_version: allowing or refusing TLS 1.0 and 1.1 takes a restart "
                 "(OpenSSL's security level of the listening socket is set when it starts)"],
            )
        return config

    def apply(self, config: WebConfig | None) -> None:
        """Put a config from `load` in force: new handshakes and requests use it."""
        if config is None:
            return
        if self.ssl_context is not None and config.tls is not None:
            from exporter.web_config import apply_policy

            apply_policy(self.ssl_context, config.tls)
        self._config = config
        log.info("web config reloaded from %s", config.path)

    def install(self, app: web.Application, open_paths: Collection[str]) -> None:
        """Guard every route of `app` but `open_paths`, and add the configured headers to every response."""
        app.middlewares.append(self._guard(frozenset(open_paths)))
        app.on_response_prepare.append(self._add_headers)

    def _guard(self, open_paths: frozenset[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            users = self._config.users if self._config is not None else None
            resource = request.match_info.route.resource
            if users is None or (resource is not None and resource.canonical in open_paths):
                return await handler(request)
            credentials = basic_credentials(request.headers.get("Authorization"))
            if credentials is None or not await users.check(*credentials):
                return web.Response(
                    status=401,
                    text="401 Unauthorized\n",
                    headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
                )
            return await handler(request)

        return guard

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in self._config.headers if self._config is not None else ():
            response.headers[name] = value

    def _hand_over(self, connection: ssl.SSLObject, server_name: str | None, listener: ssl.SSLContext) -> None:
        if self._config is not None and self._config.ssl_context is not None:
            connection.context = self._config.ssl_context
