"""The web config of `probe run --web.config.file`: loading, basic auth, TLS, SIGHUP rotation, and a real Prometheus.

Certificates are made here by trustme; TLS clients are Python's ssl module and Prometheus 2.42 itself; the daemon
is a subprocess on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import bcrypt
import pytest
import trustme
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from canary.config import ConfigError
from exporter.basic_auth import BasicAuthUsers, basic_credentials
from exporter.web_config import load_web_config
from exporter.web_security import WebSecurity
from tests.conftest import Process, ROOT, free_port, probe_command, start_app, wait_for, wait_for_port, write_config

PASSWORD = "first-Pw-4417"
ROTATED_PASSWORD = "rotated-Pw-9023"
PLAIN_TEXT_PASSWORD = "hunter2-plain-0001"
ALLOWED = "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection"


def bcrypt_hash(password: str, cost: int = 6) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


@dataclass(frozen=True)
class PKI:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and one from a stranger CA."""

    folder: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path

    def issue_server_cert(self, cert_path: Path, key_path: Path) -> bytes:
        """A new server certificate written over the given files; returns its DER bytes."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(key_path))
        leaf.cert_chain_pems[0].write_to_path(str(cert_path))
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = trustme.CA(), trustme.CA()
    files: dict[str, Path] = {}
    for name, leaf in (
        ("server", ca.issue_cert("127.0.0.1", "localhost")),
        ("client", ca.issue_cert("prometheus.canary.test")),
        ("stranger", stranger_ca.issue_cert("prometheus.canary.test")),
    ):
        files[f"{name}_cert"], files[f"{name}_key"] = folder / f"{name}.pem", folder / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(files[f"{name}_cert"]))
        leaf.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return PKI(folder=folder, ca=ca, ca_file=folder / "ca.pem", **files)


def client_context(
    pki: PKI,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    cert: tuple[Path, Path] | None = None,
    legacy: bool = False,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if legacy:  # OpenSSL 3 refuses TLS 1.0 and 1.1 at its default security level, on the client side too
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # Python deprecates TLS 1.1; the point here is to try it
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: str
    tls_version: str | None
    server_cert: bytes | None


def https_get(port: int, path: str, context: ssl.SSLContext, user: str | None = None, password: str = "") -> Answer:
    """One request on a fresh connection, so each call is a new TLS handshake."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        headers = {}
        if user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode()
        assert connection.sock is not None
        return Answer(response.status, response.headers, body, connection.sock.version(),
                      connection.sock.getpeercert(binary_form=True))
    finally:
        connection.close()




# --- Loading: every bad file is refused with one exact line per problem ---------------------------------------

TLS = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
BAD_CONFIGS = [
    ("plain_text_password", f"basic_auth_users:\n  alice: {PLAIN_TEXT_PASSWORD}\n",
     "basic_auth_users.alice: not a bcrypt hash (plain-text passwords are refused)"),
    ("password_as_a_number", "basic_auth_users:\n  alice: 12345678\n",
     "basic_auth_users.alice: not a bcrypt hash (plain-text passwords are refused)"),
    ("user_with_a_colon", "basic_auth_users:\n  'al:ice': '{hash}'\n",
     "basic_auth_users.al:ice: a user name cannot contain ':' (basic auth splits on it)"),
    ("user_written_twice", "basic_auth_users:\n  alice: '{hash}'\n  alice: '{hash}'\n",
     "not valid YAML at line 3, column 3: the key 'alice' is written twice"),
    ("unknown_top_level_key", "tls_config:\n  cert_file: server.pem\n", "tls_config: unknown key"),
    ("unknown_tls_key", TLS + "  min_versoin: TLS13\n", "tls_server_config.min_versoin: unknown key"),
    ("unknown_http_key", "http_server_config:\n  http3: true\n", "http_server_config.http3: unknown key"),
    ("missing_cert_file", "tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
     "tls_server_config.cert_file: cannot read '{dir}/missing.pem' (No such file or directory)"),
    ("missing_key_file", "tls_server_config:\n  cert_file: server.pem\n  key_file: missing.key\n",
     "tls_server_config.key_file: cannot read '{dir}/missing.key' (No such file or directory)"),
    ("missing_client_ca_file", TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: nope.pem\n",
     "tls_server_config.client_ca_file: cannot read '{dir}/nope.pem' (No such file or directory)"),
    ("no_key_file", "tls_server_config:\n  cert_file: server.pem\n", "tls_server_config.key_file: required to serve TLS"),
    ("cert_file_holds_a_key", "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
     "tls_server_config.cert_file: no PEM certificate in '{dir}/server.key'"),
    ("key_file_holds_a_cert", "tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n",
     "tls_server_config.key_file: no PEM private key in '{dir}/server.pem'"),
    ("encrypted_key", "tls_server_config:\n  cert_file: server.pem\n  key_file: encrypted.key\n",
     "tls_server_config.key_file: '{dir}/encrypted.key' is encrypted (give an unencrypted key, readable only by the daemon)"),
    ("key_of_another_cert", "tls_server_config:\n  cert_file: server.pem\n  key_file: client.key\n",
     "tls_server_config.key_file: '{dir}/client.key' is not the key of the certificate in cert_file"),
    ("bad_min_version", TLS + "  min_version: TLS1.1\n",
     "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13 (got 'TLS1.1')"),
    ("min_above_max", TLS + "  min_version: TLS13\n  max_version: TLS12\n",
     "tls_server_config.min_version: TLS13 is above max_version TLS12"),
    ("unknown_client_auth_type", TLS + "  client_auth_type: RequireClientCertPlease\n",
     "tls_server_config.client_auth_type: must be one of NoClientCert, RequestClientCert, RequireAnyClientCert, "
     "VerifyClientCertIfGiven, RequireAndVerifyClientCert (got 'RequireClientCertPlease')"),
    ("client_ca_without_a_policy", TLS + "  client_ca_file: ca.pem\n",
     "tls_server_config.client_ca_file: set, but client_auth_type is NoClientCert, which never asks for a client certificate"),
    ("policy_without_client_ca", TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config.client_auth_type: RequireAndVerifyClientCert needs client_ca_file "
     "(Python's ssl module verifies every client certificate it accepts)"),
    ("cipher_suites", TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]\n",
     "tls_server_config.cipher_suites: not supported: Python's ssl module takes OpenSSL cipher names, not Go's; "
     "remove it for OpenSSL's defaults"),
    ("curve_preferences", TLS + "  curve_preferences: [X25519]\n",
     "tls_server_config.curve_preferences: not supported: Python's ssl module cannot set a curve preference list; "
     "remove it for OpenSSL's defaults"),
    ("inline_key", "tls_server_config:\n  cert_file: server.pem\n  key: secret-pem-text\n",
     "tls_server_config.key: inline PEM is not supported: put the key in a file and use key_file"),
    ("rate_limit", "rate_limit:\n  interval: 1s\n  burst: 5\n",
     "rate_limit: not supported: put a rate-limiting proxy in front of channel-canary"),
    ("reserved_header_authorization", "http_server_config:\n  headers:\n    Authorization: Basic abc\n",
     f"http_server_config.headers.Authorization: cannot be configured (allowed: {ALLOWED})"),
    ("reserved_header_content_type", "http_server_config:\n  headers:\n    Content-Type: text/html\n",
     f"http_server_config.headers.Content-Type: cannot be configured (allowed: {ALLOWED})"),
    ("bad_frame_options", "http_server_config:\n  headers:\n    X-Frame-Options: allow-from-anywhere\n",
     "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin (got 'allow-from-anywhere')"),
    ("not_yaml", "basic_auth_users:\n  alice: [unclosed\n",
     "not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    ("not_a_mapping", "- tls_server_config\n",
     "must be a YAML mapping of tls_server_config, http_server_config and basic_auth_users"),
]


@pytest.fixture
def web_folder(tmp_path: Path, pki: PKI) -> Path:
    """A folder holding a server certificate and key, the CA, and a client key: what the table's files name."""
    for source in (pki.server_cert, pki.server_key, pki.client_key, pki.ca_file):
        shutil.copy(source, tmp_path / source.name)
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    (tmp_path / "encrypted.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass")
    ))
    return tmp_path


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CONFIGS, ids=[case for case, _, _ in BAD_CONFIGS])
def test_a_bad_web_config_is_refused_naming_the_file_and_key(web_folder: Path, case: str, text: str, expected: str) -> None:
    hashed = bcrypt_hash("pw", cost=4)
    path = write_config(web_folder, text.replace("{hash}", hashed), name="web.yml")
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert str(caught.value) == f"{path}: {expected.replace('{dir}', str(web_folder))}"
    for secret in (PLAIN_TEXT_PASSWORD, hashed, "secret-pem-text"):
        assert secret not in str(caught.value)


def test_every_problem_is_listed_at_once(web_folder: Path) -> None:
    path = write_config(web_folder, f"""
        basic_auth_users:
          alice: {PLAIN_TEXT_PASSWORD}
        rate_limit:
          burst: 1
        extra: 1
    """, name="web.yml")
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert caught.value.problems == [
        "rate_limit: not supported: put a rate-limiting proxy in front of channel-canary",
        "basic_auth_users.alice: not a bcrypt hash (plain-text passwords are refused)",
        "extra: unknown key",
    ]


def test_an_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    config = load_web_config(write_config(tmp_path, "", name="web.yml"))
    assert (config.tls, config.ssl_context, config.users, config.headers) == (None, None, None, ())
    config = load_web_config(write_config(tmp_path, "tls_server_config:\nbasic_auth_users: {}\n", name="web.yml"))
    assert (config.tls, config.users) == (None, None)


def test_relative_files_are_found_beside_the_web_config_and_http2_is_accepted(web_folder: Path) -> None:
    path = write_config(web_folder, TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.pem\n"
                        "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n    X-XSS-Protection: ''\n",
                        name="web.yml")
    config = load_web_config(path)
    assert config.tls is not None and config.tls.cert_file == web_folder / "server.pem"
    assert config.tls.verify_mode == ssl.CERT_OPTIONAL and config.tls.min_version == ssl.TLSVersion.TLSv1_2
    assert config.headers == (("X-Frame-Options", "deny"),)  # a blank value sets nothing, as in exporter-toolkit


# --- Basic auth: bcrypt off the event loop, successes remembered, unknown users priced like wrong passwords -------

async def test_2a_2b_and_2y_hashes_all_verify() -> None:
    hashed = bcrypt_hash("pw", cost=4)
    for prefix in ("$2a$", "$2b$", "$2y$"):
        users = BasicAuthUsers({"alice": prefix + hashed[4:]})
        assert await users.check("alice", b"pw") and not await users.check("alice", b"px")


async def test_a_success_is_remembered_and_a_failure_costs_a_bcrypt_every_time() -> None:
    users = BasicAuthUsers({"alice": bcrypt_hash("pw")})
    assert await users.check("alice", b"pw") and await users.check("alice", b"pw")
    assert users.bcrypt_runs == 1
    assert not await users.check("alice", b"wrong") and not await users.check("alice", b"wrong")
    assert users.bcrypt_runs == 3
    assert not await users.check("alice", b"x" * 100)  # bcrypt 5 refuses > 72 bytes; that is a wrong password
    # Remembered per user and password: another user's success does not carry over.
    assert not await users.check("mallory", b"pw")


async def test_an_unknown_user_costs_one_bcrypt_at_the_same_cost_as_a_known_one() -> None:
    users = BasicAuthUsers({"alice": bcrypt_hash("pw", cost=4), "bob": bcrypt_hash("pw", cost=7)})
    assert users.hash_for("nobody")[:7] == b"$2b$07$" and users.hash_for("nobody") not in (users.hash_for("alice"), users.hash_for("bob"))
    before = users.bcrypt_runs
    assert not await users.check("nobody", b"pw")
    assert not await users.check("nobody", b"pw")
    assert users.bcrypt_runs == before + 2


@pytest.mark.parametrize(("header", "expected"), [
    ("Basic " + base64.b64encode(b"alice:p:w").decode(), ("alice", b"p:w")),
    ("basic " + base64.b64encode("zoë:pw".encode()).decode(), ("zoë", b"pw")),
    ("Basic " + base64.b64encode(b"alice").decode(), None),
    ("Basic not-base64!", None),
    ("Bearer abc", None),
    ("", None),
    (None, None),
])
def test_basic_credentials_are_read_strictly(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert basic_credentials(header) == expected


# --- TLS versions, served in-process by the same code the daemon uses ---------------------------------------------

def handshake(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return str(tls.version())


async def serve_web_config(folder: Path, text: str) -> tuple[web.AppRunner, int]:
    security = WebSecurity.from_file(write_config(folder, text, name="web.yml"))
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app.router.add_get("/healthz", healthz)
    security.install(app, {"/healthz"})
    runner, url = await start_app(app, ssl_context=security.ssl_context)
    return runner, int(url.rsplit(":", 1)[1])


async def test_a_tls13_only_server_refuses_a_client_that_stops_at_tls12(web_folder: Path, pki: PKI) -> None:
    runner, port = await serve_web_config(web_folder, TLS + "  min_version: TLS13\n")
    try:
        assert await asyncio.to_thread(handshake, port, client_context(pki)) == "TLSv1.3"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    finally:
        await runner.cleanup()


# --- The daemon as a subprocess ----------------------------------------------------------------------------------

DAEMON_CONFIG = """
    [daemon]
    interval = "1s"
    timeout = "500ms"
    jitter = "100ms"
    shutdown_grace = "1s"

    [[probes]]
    name = "closed-port"
    type = "tcp"
    channel = "api"
    host = "127.0.0.1"
    port = {port}
"""


@dataclass
class RunningDaemon:
    process: Process
    port: int
    web_config: Path


@pytest.fixture
def start_daemon(tmp_path: Path, pki: PKI) -> Iterator[Callable[[str], RunningDaemon]]:
    """Starts `probe run --web.config.file` on a copy of the PKI's files (so a test may rotate them)."""
    started: list[Process] = []
    folder = tmp_path / "daemon"
    folder.mkdir()
    for source in (pki.server_cert, pki.server_key, pki.ca_file):
        shutil.copy(source, folder / source.name)

    def start(web_text: str) -> RunningDaemon:
        config = write_config(folder, DAEMON_CONFIG.replace("{port}", str(free_port())))
        web_config = write_config(folder, web_text, name="web.yml")
        port = free_port()
        process = Process(probe_command("run", "--config", str(config), "--web.config.file", str(web_config),
                                        "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
        started.append(process)
        wait_for_port(port, process)
        return RunningDaemon(process, port, web_config)

    yield start
    for process in started:
        process.stop()


def users_text(**passwords: str) -> str:
    return "basic_auth_users:\n" + "".join(f"  {user}: '{bcrypt_hash(pw)}'\n" for user, pw in passwords.items())


def test_the_daemon_over_tls_asks_for_basic_auth_except_on_health_endpoints(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI
) -> None:
    daemon = start_daemon(TLS + users_text(prometheus=PASSWORD) +
                          "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    tls12 = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)

    wait_for(lambda: https_get(daemon.port, "/readyz", tls12).status == 200)
    for path in ("/healthz", "/readyz"):  # kubelet probes send no credentials
        answer = https_get(daemon.port, path, tls12)
        assert answer.status == 200 and answer.tls_version == "TLSv1.2"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"

    for path in ("/metrics", "/", "/status.json", "/no-such-page"):
        for user, password in ((None, ""), ("prometheus", "wrong-password"), ("nobody", PASSWORD), ("prometheus", "")):
            answer = https_get(daemon.port, path, tls12, user, password)
            assert answer.status == 401, (path, user)
            assert answer.headers["WWW-Authenticate"] == 'Basic realm="channel-canary", charset="UTF-8"'
            assert answer.headers["X-Content-Type-Options"] == "nosniff"

    metrics = https_get(daemon.port, "/metrics", tls12, "prometheus", PASSWORD)
    assert metrics.status == 200 and "canary_build_info" in metrics.body
    assert metrics.headers["X-Content-Type-Options"] == "nosniff"
    assert https_get(daemon.port, "/", tls12, "prometheus", PASSWORD).status == 200
    assert json.loads(https_get(daemon.port, "/status.json", client_context(pki), "prometheus", PASSWORD).body)["probes"]

    output = daemon.process.output()
    assert "serving on https://" in output
    assert PASSWORD not in output and "wrong-password" not in output and "$2b$" not in output


def test_the_daemon_refuses_a_tls11_client_that_a_tls10_server_accepts(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI, web_folder: Path
) -> None:
    """The TLS 1.1 client is shown able to connect (to a server that allows it) before the daemon refuses it."""
    tls11 = client_context(pki, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1, legacy=True)

    async def tls10_server_handshake() -> str:
        runner, port = await serve_web_config(web_folder, TLS + "  min_version: TLS10\n")
        try:
            return await asyncio.to_thread(handshake, port, tls11)
        finally:
            await runner.cleanup()

    assert asyncio.run(tls10_server_handshake()) == "TLSv1.1"

    daemon = start_daemon(TLS)  # min_version defaults to TLS12
    with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
        handshake(daemon.port, tls11)
    # The server hung up on (or alerted) the ClientHello; a client unable to offer TLS 1.1 would fail before sending
    # anything, with NO_PROTOCOLS_AVAILABLE or UNSUPPORTED_PROTOCOL.
    assert isinstance(refused.value, (ssl.SSLEOFError, ConnectionResetError)) \
        or getattr(refused.value, "reason", None) == "TLSV1_ALERT_PROTOCOL_VERSION", repr(refused.value)
    assert handshake(daemon.port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"


def test_require_and_verify_client_cert_lets_in_only_clients_of_the_client_ca(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI
) -> None:
    daemon = start_daemon(TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n")
    with_cert = client_context(pki, cert=(pki.client_cert, pki.client_key))
    wait_for(lambda: https_get(daemon.port, "/readyz", with_cert).status == 200)
    assert https_get(daemon.port, "/metrics", with_cert).status == 200
    for refused in (client_context(pki), client_context(pki, cert=(pki.stranger_cert, pki.stranger_key)),
                    client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)):
        # TLS 1.3 clients finish their side of the handshake before the server reads their certificate, so the
        # refusal shows on the first read; TLS 1.2 ones fail in the handshake. Either way, no answer comes back.
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(daemon.port, "/healthz", refused)


def test_sighup_rotates_certificate_and_password_without_a_restart(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI
) -> None:
    daemon = start_daemon(TLS + users_text(prometheus=PASSWORD))
    context = client_context(pki)
    wait_for(lambda: https_get(daemon.port, "/readyz", context).status == 200)
    pid = daemon.process.popen.pid
    first = https_get(daemon.port, "/metrics", context, "prometheus", PASSWORD)
    assert first.status == 200

    folder = daemon.web_config.parent
    new_cert = pki.issue_server_cert(folder / "server.pem", folder / "server.key")
    assert new_cert != first.server_cert
    daemon.web_config.write_text(TLS + users_text(prometheus=ROTATED_PASSWORD))
    daemon.process.popen.send_signal(signal.SIGHUP)

    wait_for(lambda: https_get(daemon.port, "/metrics", context, "prometheus", ROTATED_PASSWORD).status == 200)
    assert https_get(daemon.port, "/metrics", context, "prometheus", PASSWORD).status == 401
    assert https_get(daemon.port, "/healthz", context).server_cert == new_cert
    assert daemon.process.popen.poll() is None and daemon.process.popen.pid == pid

    # A broken web config on the next SIGHUP: logged, counted, and the rotated one keeps serving.
    daemon.web_config.write_text(f"basic_auth_users:\n  prometheus: {PLAIN_TEXT_PASSWORD}\n")
    daemon.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "not a bcrypt hash" in daemon.process.output())
    assert f"{daemon.web_config}: basic_auth_users.prometheus: not a bcrypt hash (plain-text passwords are refused)" \
        in daemon.process.output()
    metrics = https_get(daemon.port, "/metrics", context, "prometheus", ROTATED_PASSWORD)
    assert metrics.status == 200 and "canary_config_last_reload_successful 0" in metrics.body
    assert https_get(daemon.port, "/healthz", context).server_cert == new_cert

    output = daemon.process.output()
    for secret in (PASSWORD, ROTATED_PASSWORD, PLAIN_TEXT_PASSWORD, "$2b$"):
        assert secret not in output


def test_sighup_applies_a_new_tls_policy_to_new_connections_and_refuses_turning_tls_off(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI
) -> None:
    daemon = start_daemon(TLS)
    tls12, with_cert = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2), client_context(pki, cert=(pki.client_cert, pki.client_key))
    wait_for(lambda: https_get(daemon.port, "/readyz", tls12).status == 200)

    daemon.web_config.write_text(TLS + "  min_version: TLS13\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n")
    daemon.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "web config reloaded" in daemon.process.output())
    assert https_get(daemon.port, "/metrics", with_cert).tls_version == "TLSv1.3"
    for refused in (tls12, client_context(pki)):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(daemon.port, "/healthz", refused)

    # Plain HTTP on a TLS socket cannot happen in place: the reload is refused whole and TLS stays on.
    daemon.web_config.write_text(users_text(prometheus=PASSWORD))
    daemon.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "switching TLS on or off takes a restart" in daemon.process.output())
    assert https_get(daemon.port, "/metrics", with_cert).status == 200  # and no password asked: nothing applied


def test_a_bad_web_config_at_start_exits_2_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, DAEMON_CONFIG.replace("{port}", "1"))
    web_config = write_config(tmp_path, f"basic_auth_users:\n  alice: {PLAIN_TEXT_PASSWORD}\n", name="web.yml")
    completed = subprocess.run(
        probe_command("run", "--config", str(config), "--web.config.file", str(web_config), "--listen", f"127.0.0.1:{free_port()}"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert completed.returncode == 2
    assert f"{web_config}: basic_auth_users.alice: not a bcrypt hash (plain-text passwords are refused)" in completed.stderr
    assert "Traceback" not in completed.stderr and PLAIN_TEXT_PASSWORD not in completed.stderr + completed.stdout


# --- A real Prometheus scrapes the daemon over TLS with basic auth --------------------------------------------------

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def prometheus_query(base: str, query: str) -> list[dict]:  # type: ignore[type-arg]
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def query_value(base: str, query: str) -> str | None:
    try:
        result = prometheus_query(base, query)
    except OSError:
        return None  # not up yet
    return result[0]["value"][1] if result else None


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="no prometheus binary (apt-get install prometheus; scripts/test.sh does it as root)")
def test_prometheus_scrapes_the_daemon_over_tls_with_basic_auth(
    start_daemon: Callable[[str], RunningDaemon], pki: PKI, tmp_path: Path
) -> None:
    daemon = start_daemon(TLS + users_text(prometheus=PASSWORD))
    target = {"static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}], "scheme": "https",
              "tls_config": {"ca_file": str(pki.ca_file), "server_name": "localhost", "insecure_skip_verify": False}}
    prometheus_config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "canary", "basic_auth": {"username": "prometheus", "password": PASSWORD}, **target},
            {"job_name": "canary-wrong-password", "basic_auth": {"username": "prometheus", "password": "wrong"}, **target},
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config))
    port = free_port()
    prometheus = Process([PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, prometheus, timeout=30)
        wait_for(lambda: query_value(base, 'up{job="canary"}') == "1", timeout=30)
        wait_for(lambda: query_value(base, 'up{job="canary-wrong-password"}') == "0", timeout=30)
        assert prometheus_query(base, 'canary_build_info{job="canary"}')
        assert prometheus_query(base, 'canary_probe_success{job="canary",probe="closed-port"}')
        with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as response:
            targets = json.load(response)["data"]["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        assert errors["canary"] == "" and "401" in errors["canary-wrong-password"], errors
    except AssertionError as failure:
        raise AssertionError(f"{failure}\nprometheus said:\n{prometheus.output()[-3000:]}") from None
    finally:
        prometheus.stop(timeout=15)
