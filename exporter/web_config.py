"""The web config file of `probe run --web.config.file`: TLS, basic-auth users and extra response headers.

It is the YAML file every Prometheus exporter reads (prometheus/exporter-toolkit, `docs/web-configuration.md`), so
one file can secure all the exporters on a host. Loading is all-or-nothing: a WebConfig whose certificate, key and
client CAs have already been loaded into an SSLContext, or a ConfigError listing every problem, each as
`FILE: KEY.PATH: what is wrong`. Hashes, keys and passwords are never quoted in an error.

Where Python's ssl module cannot do what Go's crypto/tls does, the key is refused with the reason rather than
ignored: inline PEM, `cipher_suites`, `curve_preferences`, `client_allowed_sans`, `rate_limit`.
"""

from __future__ import annotations

import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationError

from canary.config import ConfigError
from exporter.basic_auth import BasicAuthUsers, is_bcrypt_hash

TLSVersionName = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
ClientAuthType = Literal[
    "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"
]
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's client-auth policies as Python verify modes. Python cannot take a client certificate without verifying it,
# so RequestClientCert and RequireAnyClientCert verify it against client_ca_file too (Go accepts any certificate).
CLIENT_AUTH: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# exporter-toolkit's allow-list (web/handler.go): no other header can be set, and two only to these values.
ALLOWED_HEADERS: dict[str, tuple[str, ...]] = {
    "Content-Security-Policy": (),
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
}
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("tls_server_config", "cert"): "inline PEM is not supported: put the certificate in a file and use cert_file",
    ("tls_server_config", "key"): "inline PEM is not supported: put the key in a file and use key_file",
    ("tls_server_config", "client_ca"): "inline PEM is not supported: put the CAs in a file and use client_ca_file",
    ("tls_server_config", "cipher_suites"): (
        "not supported: Python's ssl module takes OpenSSL cipher names, not Go's; remove it for OpenSSL's defaults"
    ),
    ("tls_server_config", "curve_preferences"): (
        "not supported: Python's ssl module cannot set a curve preference list; remove it for OpenSSL's defaults"
    ),
    ("tls_server_config", "client_allowed_sans"): (
        "not supported: Python's ssl module has no hook to check a client certificate's names; use a client CA "
        "that signs only the clients you allow"
    ),
    ("", "rate_limit"): "not supported: put a rate-limiting proxy in front of channel-canary",
}
_NOT_BCRYPT = "not a bcrypt hash (plain-text passwords are refused)"


def _bcrypt_hash(value: Any) -> Any:
    if not is_bcrypt_hash(value):
        raise ValueError(_NOT_BCRYPT)
    return value


BcryptHash = Annotated[SecretStr, BeforeValidator(_bcrypt_hash)]


class TLSServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    client_auth_type: ClientAuthType = "NoClientCert"
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    prefer_server_cipher_suites: bool = True


class HTTPServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    http2: bool = True  # accepted so exporter files load; aiohttp serves HTTP/1.1 only, and Prometheus scrapes that
    headers: Optional[dict[str, str]] = None


class WebSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tls_server_config: Optional[TLSServerSettings] = None
    http_server_config: Optional[HTTPServerSettings] = None
    basic_auth_users: Optional[dict[str, BcryptHash]] = None


@dataclass(frozen=True)
class ServerTLS:
    """`tls_server_config` as Python's ssl module takes it, file paths resolved against the web config's folder."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    verify_mode: ssl.VerifyMode
    prefer_server_ciphers: bool

    @property
    def legacy(self) -> bool:
        """TLS 1.0 or 1.1 allowed: OpenSSL 3 needs security level 0 for them, which a reload cannot change."""
        return self.min_version < ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class WebConfig:
    """One loaded web config file: what the listener and the endpoint guard need."""

    path: Path
    tls: ServerTLS | None
    ssl_context: ssl.SSLContext | None  # certificate, key and client CAs loaded; None: plain HTTP
    users: BasicAuthUsers | None  # None: no basic auth
    headers: tuple[tuple[str, str], ...]


def load_web_config(path: Path | str) -> WebConfig:
    """Read and check one web config file, loading every file it names; raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"]) from None
    problems: list[str] = []
    raw = _parse_yaml(text, problems)
    settings = _validate(_without_unsupported(raw, problems), problems) if raw is not None else None
    if settings is None or problems:
        raise ConfigError(path, problems)

    headers = _check_headers((settings.http_server_config or HTTPServerSettings()).headers or {}, problems)
    users = {user: hashed.get_secret_value() for user, hashed in (settings.basic_auth_users or {}).items()}
    for user in users:
        if ":" in user:
            problems.append(f"basic_auth_users.{user}: a user name cannot contain ':' (basic auth splits on it)")
    tls = _check_tls(settings.tls_server_config, path.parent, problems)
    context = _loaded_context(tls, problems) if tls is not None and not problems else None
    if problems:
        raise ConfigError(path, problems)
    return WebConfig(path, tls, context, BasicAuthUsers(users) if users else None, headers)


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """A TLS server context with this policy, certificate and client CAs; raises ssl.SSLError or OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(context, tls)
    context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=tls.client_ca_file)
    return context


def apply_policy(context: ssl.SSLContext, tls: ServerTLS) -> None:
    """The settings OpenSSL copies from the listening context into each new connection: versions, client certs."""
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated in Python, and the file asked for them
        warnings.simplefilter("ignore", DeprecationWarning)
        if tls.legacy:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
        context.minimum_version = tls.min_version
        context.maximum_version = tls.max_version
    context.verify_mode = tls.verify_mode
    if tls.prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key written twice in one mapping, as Go's yaml.UnmarshalStrict does (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        # Only the problem and its place: the YAML library's own message quotes the line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problems.append(f"not valid YAML{where}: {getattr(exc, 'problem', None) or 'cannot be parsed'}")
        return None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("must be a YAML mapping of tls_server_config, http_server_config and basic_auth_users")
        return None
    return raw


def _without_unsupported(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Reports each key Python cannot honour, and drops it so it is not reported again as unknown."""
    cleaned = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for (section, key), why in UNSUPPORTED.items():
        table = cleaned.get(section) if section else cleaned
        if isinstance(table, dict) and key in table:
            problems.append(f"{section}.{key}: {why}" if section else f"{key}: {why}")
            del table[key]
    return cleaned


def _validate(raw: dict[str, Any], problems: list[str]) -> WebSettings | None:
    try:
        return WebSettings.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_describe(error) for error in exc.errors(include_url=False))
        return None


def _describe(error: Any) -> str:
    loc = [part for part in error["loc"] if not str(part).startswith(("function-", "lax-", "json-"))]
    path = ".".join(str(part) for part in loc if part != "[key]")
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if "[key]" in loc:
        return f"{path}: must be a string (quote it)"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        message = "must be one of " + error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
    value = error.get("input")
    # Never quote anything under basic_auth_users: its values are hashes, or passwords typed by mistake.
    if kind != "value_error" and loc[:1] != ["basic_auth_users"] and isinstance(value, (str, int, float, bool)):
        if len(str(value)) <= 80:
            message += f" (got {value!r})"
    return f"{path}: {message}"


def _check_headers(headers: dict[str, str], problems: list[str]) -> tuple[tuple[str, str], ...]:
    allowed = ", ".join(ALLOWED_HEADERS)
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        if name not in ALLOWED_HEADERS:
            problems.append(f"{where}: cannot be configured (allowed: {allowed})")
        elif ALLOWED_HEADERS[name] and value and value not in ALLOWED_HEADERS[name]:
            problems.append(f"{where}: must be one of {', '.join(ALLOWED_HEADERS[name])} (got {value!r})")
        elif "\r" in value or "\n" in value:
            problems.append(f"{where}: must be a single line")
    # A blank value leaves the header unset, as in exporter-toolkit.
    return tuple((name, value) for name, value in headers.items() if value)


def _check_tls(settings: TLSServerSettings | None, folder: Path, problems: list[str]) -> ServerTLS | None:
    if settings is None or not settings.model_fields_set:
        return None  # absent or empty: plain HTTP, as in exporter-toolkit
    where = "tls_server_config"
    for key in ("cert_file", "key_file"):
        if not getattr(settings, key):
            problems.append(f"{where}.{key}: required to serve TLS")
    if TLS_VERSIONS[settings.min_version] > TLS_VERSIONS[settings.max_version]:
        problems.append(f"{where}.min_version: {settings.min_version} is above max_version {settings.max_version}")
    if settings.client_ca_file and settings.client_auth_type == "NoClientCert":
        problems.append(
            f"{where}.client_ca_file: set, but client_auth_type is NoClientCert, which never asks for a client certificate"
        )
    if not settings.client_ca_file and settings.client_auth_type != "NoClientCert":
        problems.append(
            f"{where}.client_auth_type: {settings.client_auth_type} needs client_ca_file "
            "(Python's ssl module verifies every client certificate it accepts)"
        )
    if problems:
        return None
    tls = ServerTLS(
        cert_file=folder / settings.cert_file,
        key_file=folder / settings.key_file,
        client_ca_file=folder / settings.client_ca_file if settings.client_ca_file else None,
        min_version=TLS_VERSIONS[settings.min_version],
        max_version=TLS_VERSIONS[settings.max_version],
        verify_mode=CLIENT_AUTH[settings.client_auth_type],
        prefer_server_ciphers=settings.prefer_server_cipher_suites,
    )
    _check_pem_files(tls, problems)
    return tls


def _check_pem_files(tls: ServerTLS, problems: list[str]) -> None:
    """Each named file is read and parsed on its own first, so an error says which file is wrong and how."""
    where = "tls_server_config"
    for key, file, kind in (
        ("cert_file", tls.cert_file, "certificate"),
        ("key_file", tls.key_file, "key"),
        ("client_ca_file", tls.client_ca_file, "certificate"),
    ):
        if file is None:
            continue
        try:
            data = file.read_bytes()
        except OSError as exc:
            problems.append(f"{where}.{key}: cannot read '{file}' ({exc.strerror or exc})")
            continue
        if kind == "certificate":
            try:
                x509.load_pem_x509_certificates(data)
            except ValueError:
                problems.append(f"{where}.{key}: no PEM certificate in '{file}'")
            continue
        try:
            serialization.load_pem_private_key(data, password=None)
        except TypeError:
            problems.append(f"{where}.{key}: '{file}' is encrypted (give an unencrypted key, readable only by the daemon)")
        except (ValueError, UnsupportedAlgorithm):
            problems.append(f"{where}.{key}: no PEM private key in '{file}'")


def _loaded_context(tls: ServerTLS, problems: list[str]) -> ssl.SSLContext | None:
    try:
        return server_context(tls)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None)
        if reason == "KEY_VALUES_MISMATCH":
            problems.append(f"tls_server_config.key_file: '{tls.key_file}' is not the key of the certificate in cert_file")
        else:
            problems.append(f"tls_server_config: OpenSSL cannot use these files ({reason or exc})")
        return None


def _no_password() -> bytes:
    # load_cert_chain would otherwise prompt on the terminal for an encrypted key.
    raise ssl.SSLError("the key is encrypted")

