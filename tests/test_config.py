"""Config loading: defaults and inheritance, durations, environment expansion, `*_file` secrets, and the exact
error each kind of bad config produces (naming the file and the key path, never showing a secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canary.config import DEFAULT_BUCKETS, ConfigError, load_config
from tests.conftest import ROOT, write_config
from probes import PROBE_TYPES
from probes.http import HttpSettings
from probes.postgres import PostgresSettings

KNOWN = ", ".join(sorted(PROBE_TYPES))

HTTP_PROBE = """
[[probes]]
name = "api"
type = "http"
channel = "api"
url = "http://127.0.0.1:8000/health"
"""

PG_PROBE = """
[[probes]]
name = "db"
type = "postgres"
channel = "database"
dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
"""

PASSWORD = "s3cr3t-pass"


def load(path: Path, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(path, PROBE_TYPES, environ={} if environ is None else environ)


def load_error(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(path, environ)
    return caught.value


# --- a valid config -------------------------------------------------------------------------------------------


def test_daemon_defaults_and_inherited_interval_and_timeout(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        HTTP_PROBE
        + """
        [[probes]]
        name = "quick"
        type = "http"
        channel = "api"
        url = "https://example.com/ping"
        interval = "5s"
        """,
    )
    config = load(path)

    daemon = config.daemon
    assert config.path == path
    assert daemon.listen == "127.0.0.1:9465"
    assert daemon.listen_host_port() == ("127.0.0.1", 9465)
    assert (daemon.interval, daemon.timeout, daemon.jitter, daemon.shutdown_grace) == (30.0, 10.0, 10.0, 10.0)
    assert daemon.history == 30
    assert daemon.labels == {}
    assert daemon.latency_buckets == DEFAULT_BUCKETS
    assert daemon.log_level == "info"

    api, quick = config.probes
    assert isinstance(api, HttpSettings) and isinstance(quick, HttpSettings)
    # Neither interval nor timeout given: both come from [daemon].
    assert (api.interval, api.timeout) == (30.0, 10.0)
    # Interval given, timeout not: the daemon's 10s timeout is cut to the 5s interval.
    assert (quick.interval, quick.timeout) == (5.0, 5.0)


def test_daemon_settings_durations_and_static_labels(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [daemon]
        listen = "0.0.0.0:9100"
        interval = "2m"
        timeout = "30s"
        jitter = "250ms"
        shutdown_grace = "1h30m"
        history = 5
        log_level = "debug"
        labels = { environment = "prod", region = "eu_west" }

        [[probes]]
        name = "api"
        type = "http"
        channel = "api"
        url = "http://127.0.0.1:8000/health"
        labels = { team = "support" }

        [[probes]]
        name = "fast"
        type = "http"
        channel = "api"
        url = "http://127.0.0.1:8000/ping"
        interval = "250ms"

        [[probes]]
        name = "slow"
        type = "postgres"
        channel = "database"
        dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
        interval = "1h30m"
        timeout = "45s"
        long_query_threshold = "2m"
        statement_timeout = "250ms"
        """,
    )
    config = load(path)

    daemon = config.daemon
    assert daemon.listen_host_port() == ("0.0.0.0", 9100)
    assert (daemon.interval, daemon.timeout, daemon.jitter, daemon.shutdown_grace) == (120.0, 30.0, 0.25, 5400.0)
    assert daemon.history == 5
    assert daemon.log_level == "debug"
    assert daemon.labels == {"environment": "prod", "region": "eu_west"}

    api, fast, slow = config.probes
    assert api.labels == {"team": "support"}
    assert fast.labels == {}
    assert (api.interval, api.timeout) == (120.0, 30.0)
    assert (fast.interval, fast.timeout) == (0.25, 0.25)
    assert isinstance(slow, PostgresSettings)
    assert (slow.interval, slow.timeout) == (5400.0, 45.0)
    assert (slow.long_query_threshold, slow.statement_timeout) == (120.0, 0.25)
    assert "postgresql://postgres@127.0.0.1:5432/postgres" in config.secrets


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("1d", 86400.0)],
)
def test_duration_strings(tmp_path: Path, written: str, seconds: float) -> None:
    path = write_config(tmp_path, f'[daemon]\ninterval = "{written}"\ntimeout = "{written}"\n')
    daemon = load(path).daemon
    assert daemon.interval == pytest.approx(seconds)
    assert daemon.timeout == pytest.approx(seconds)


# --- environment expansion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "environ", "expected"),
    [
        ("${V}", {"V": "value"}, "value"),
        ("${V}", {"V": ""}, ""),
        ("${V:-fallback}", {}, "fallback"),
        ("${V:-fallback}", {"V": ""}, "fallback"),
        ("${V:-fallback}", {"V": "value"}, "value"),
        ("${V-fallback}", {}, "fallback"),
        ("${V-fallback}", {"V": ""}, ""),
        ("${V-fallback}", {"V": "value"}, "value"),
        ("${V:-}", {}, ""),
        ("$${V}", {"V": "value"}, "${V}"),
        ("cost $$5", {}, "cost $5"),
        ("$$$${V}", {"V": "value"}, "$${V}"),
        ("$$${V}", {"V": "value"}, "$value"),
        ("a-${A}-b-${B:-c}", {"A": "1"}, "a-1-b-c"),
        # `environ` is the whole environment: a variable set in os.environ is not consulted.
        ("${HOME:-no-home}", {}, "no-home"),
    ],
)
def test_environment_expansion(tmp_path: Path, template: str, environ: dict[str, str], expected: str) -> None:
    path = write_config(tmp_path, HTTP_PROBE + f'description = "{template}"\n')
    (probe,) = load(path, environ).probes
    assert probe.description == expected


def test_expansion_reaches_nested_values_and_typed_fields(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [daemon]
        listen = "${LISTEN:-127.0.0.1:9465}"
        labels = { environment = "${ENVIRONMENT:-dev}" }

        [[probes]]
        name = "api"
        type = "http"
        channel = "api"
        url = "${PLATFORM_URL}/health"
        interval = "${API_INTERVAL:-15s}"
        headers = { Authorization = "Bearer ${API_TOKEN}" }
        """,
    )
    environ = {"LISTEN": "0.0.0.0:9000", "ENVIRONMENT": "staging", "PLATFORM_URL": "https://support.example.com", "API_TOKEN": "tok-123456"}
    config = load(path, environ)
    (probe,) = config.probes
    assert config.daemon.listen == "0.0.0.0:9000"
    assert config.daemon.labels == {"environment": "staging"}
    assert isinstance(probe, HttpSettings)
    assert probe.url == "https://support.example.com/health"
    assert probe.interval == 15.0
    assert probe.headers == {"Authorization": "Bearer tok-123456"}
    assert "Bearer tok-123456" in config.secrets


# --- `*_file` secrets -----------------------------------------------------------------------------------------


def test_dsn_file_is_read_and_its_trailing_newline_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text("postgresql://canary:file-pw-123@db.internal:5432/support\n")
    path = write_config(
        tmp_path,
        """
        [[probes]]
        name = "db"
        type = "postgres"
        channel = "database"
        dsn_file = "${SECRETS_DIR}/database-url"
        """,
    )
    config = load(path, {"SECRETS_DIR": str(tmp_path)})
    (probe,) = config.probes
    assert isinstance(probe, PostgresSettings)
    assert probe.dsn.get_secret_value() == "postgresql://canary:file-pw-123@db.internal:5432/support"
    assert "postgresql://canary:file-pw-123@db.internal:5432/support" in config.secrets
    assert "file-pw-123" not in repr(probe)
    assert config.scrubber()("dsn is postgresql://canary:file-pw-123@db.internal:5432/support") == "dsn is ***"


# --- bad configs: each kind and the exact problem it reports ----------------------------------------------------

# `{tmp}` in a body or an expected problem stands for the test's tmp_path.
KAFKA_PROBES = """
[[probes]]
name = "kafka"
type = "kafka"
channel = "kafka"
bootstrap_servers = "127.0.0.1:9092"
canary_topic = "fte.canary"

[[probes]]
name = "kafka-lag"
type = "kafka_lag"
channel = "kafka"
bootstrap_servers = "127.0.0.1:9092"
groups = [{ name = "fte-workers", topics = ["fte.tickets.incoming"] }]
"""

BAD_CONFIGS = [
    pytest.param(
        KAFKA_PROBES.replace('canary_topic = "fte.canary"', 'canary_topic = "fte.canary"\nmanage_topic = "no"')
        .replace("groups =", "max_lag_age = 60\ngroups ="),
        ["probes[0].manage_topic: Input should be a valid boolean (got 'no')",
         'probes[1].max_lag_age: expected a duration string such as "30s" or "2m", got int'],
        id="kafka-manage-topic-and-max-lag-age",
    ),
    pytest.param(
        'color = "blue"\n' + HTTP_PROBE,
        ["color: unknown key (the top level takes [daemon] and [[probes]])"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        '[daemon]\nlisten_on = "127.0.0.1:9465"\n' + HTTP_PROBE,
        ["daemon.listen_on: unknown key; did you mean 'listen'?"],
        id="unknown-daemon-key",
    ),
    pytest.param(
        HTTP_PROBE + HTTP_PROBE.replace('name = "api"', 'name = "api2"').replace("url =", "urll ="),
        ["probes[1].url: required key is missing", "probes[1].urll: unknown key; did you mean 'url'?"],
        id="unknown-probe-key",
    ),
    pytest.param(
        HTTP_PROBE + 'intervall = "5s"\nsevrity = "warning"\nzzz = 1\n',
        ["probes[0].intervall: unknown key; did you mean 'interval'?",
         "probes[0].sevrity: unknown key; did you mean 'severity'?", "probes[0].zzz: unknown key"],
        id="typos-suggest-the-nearest-key-and-nonsense-suggests-none",
    ),
    pytest.param(
        "[daemon]\ninterval = 30\n" + HTTP_PROBE,
        ['daemon.interval: expected a duration string such as "30s" or "2m", got int'],
        id="duration-as-number",
    ),
    pytest.param(
        HTTP_PROBE + 'interval = "30 seconds"\n',
        ['probes[0].interval: \'30 seconds\' is not a duration (use a number and a unit: ms, s, m, h, d, e.g. "30s")'],
        id="bad-duration-string",
    ),
    pytest.param(
        HTTP_PROBE + 'timeout = "0s"\n',
        ["probes[0].timeout: must be greater than zero"],
        id="zero-duration",
    ),
    pytest.param(
        HTTP_PROBE.replace('url = "http://127.0.0.1:8000/health"', ""),
        ["probes[0].url: required key is missing"],
        id="missing-url",
    ),
    pytest.param(
        HTTP_PROBE.replace('type = "http"', 'type = "smtp"'),
        [f"probes[0].type: unknown probe type 'smtp' (known: {KNOWN})"],
        id="unknown-probe-type",
    ),
    pytest.param(
        HTTP_PROBE.replace('type = "http"', 'type = ["http"]'),
        [f"probes[0].type: unknown probe type ['http'] (known: {KNOWN})"],
        id="probe-type-not-a-string",
    ),
    pytest.param(
        HTTP_PROBE.replace('type = "http"', ""),
        [f"probes[0].type: required key is missing (one of: {KNOWN})"],
        id="missing-probe-type",
    ),
    pytest.param(
        HTTP_PROBE + PG_PROBE + PG_PROBE.replace('name = "db"', 'name = "api"'),
        ["probes[2].name: duplicate probe name 'api' (first used by probes[0])"],
        id="duplicate-probe-name",
    ),
    pytest.param(
        HTTP_PROBE + 'runbook_url = "runbooks/whatsapp.md"\n',
        ["probes[0].runbook_url: must be an http:// or https:// URL, got 'runbooks/whatsapp.md'"],
        id="runbook-url-not-http",
    ),
    pytest.param(
        '[daemon]\nstate_dir = ""\n' + HTTP_PROBE,
        ["daemon.state_dir: must be a directory's path; leave the key out for the default directory"],
        id="empty-state-dir",
    ),
    pytest.param(
        HTTP_PROBE + 'interval = "10s"\ntimeout = "20s"\n',
        ["probes[0].timeout: 20s is longer than the interval 10s (a probe never overlaps itself)"],
        id="timeout-longer-than-interval",
    ),
    pytest.param(
        '[daemon]\ntimeout = "1m"\n' + HTTP_PROBE + 'timeout = "45s"\n',
        ["probes[0].timeout: 45s is longer than the interval 30s (a probe never overlaps itself)"],
        id="timeout-longer-than-inherited-interval",
    ),
    pytest.param(
        HTTP_PROBE.replace("http://127.0.0.1:8000", "${PLATFORM_URL}"),
        [
            "probes[0].url: environment variable PLATFORM_URL is not set (write ${PLATFORM_URL:-default} to give a default)",
            # The consequence, reported too: the URL as expanded is not absolute.
            "probes[0].url: must be an absolute http:// or https:// URL, got '/health'",
        ],
        id="unset-environment-variable",
    ),
    pytest.param(
        "[daemon]\nlabels = { environment = \"${CANARY_ENVIRONMENT}\" }\n" + HTTP_PROBE,
        [
            "daemon.labels.environment: environment variable CANARY_ENVIRONMENT is not set"
            " (write ${CANARY_ENVIRONMENT:-default} to give a default)"
        ],
        id="unset-environment-variable-in-label",
    ),
    pytest.param(
        HTTP_PROBE + 'verify_tls = "false"\nmax_body_bytes = "1048576"\n',
        [
            "probes[0].max_body_bytes: Input should be a valid integer (got '1048576')",
            "probes[0].verify_tls: Input should be a valid boolean (got 'false')",
        ],
        id="strings-are-never-coerced-to-booleans-or-numbers",
    ),
    pytest.param(
        "[daemon]\nhistory = 30.0\n" + HTTP_PROBE + 'expect_json = { status = 1 }\nheaders = { X-Retries = 3 }\n',
        [
            "daemon.history: Input should be a valid integer (got 30.0)",
            "probes[0].headers.X-Retries: Input should be a valid string (got 3)",
        ],
        id="floats-are-not-ints-and-numbers-are-not-strings",
    ),
    pytest.param(
        HTTP_PROBE + 'labels = { "team-name" = "support" }\n',
        ["probes[0].labels: label name 'team-name' is not a valid Prometheus label name"],
        id="bad-label-name",
    ),
    pytest.param(
        HTTP_PROBE + 'labels = { __meta = "x" }\n',
        ["probes[0].labels: label name '__meta' is not a valid Prometheus label name"],
        id="double-underscore-label-name",
    ),
    pytest.param(
        '[daemon]\nlabels = { channel = "chat" }\n' + HTTP_PROBE,
        ["daemon.labels: label name 'channel' is reserved (set by channel-canary itself)"],
        id="reserved-label-name",
    ),
    pytest.param(
        HTTP_PROBE + 'name = "again"\n',
        ["not valid TOML: Cannot overwrite a value (at line 7, column 15)"],
        id="invalid-toml-duplicate-key",
    ),
    pytest.param(
        "[daemon\n" + HTTP_PROBE,
        ["not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"],
        id="invalid-toml-syntax",
    ),
    pytest.param(
        HTTP_PROBE.replace("http://127.0.0.1:8000/health", "ftp://127.0.0.1/health"),
        ["probes[0].url: must be an absolute http:// or https:// URL, got 'ftp://127.0.0.1/health'"],
        id="bad-url-scheme",
    ),
    pytest.param(
        HTTP_PROBE.replace("http://127.0.0.1:8000/health", "127.0.0.1:8000/health"),
        ["probes[0].url: must be an absolute http:// or https:// URL, got '127.0.0.1:8000/health'"],
        id="url-without-scheme",
    ),
    pytest.param(
        PG_PROBE + 'dsn_file = "{tmp}/database-url"\n',
        ["probes[0].dsn_file: set either dsn or dsn_file, not both"],
        id="dsn-and-dsn-file",
    ),
    pytest.param(
        PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', 'dsn_file = "{tmp}/no-such-secret"'),
        ["probes[0].dsn_file: cannot read the file '{tmp}/no-such-secret' (No such file or directory)"],
        id="unreadable-dsn-file",
    ),
    pytest.param(
        PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', 'dsn_file = "{tmp}"'),
        ["probes[0].dsn_file: cannot read the file '{tmp}' (Is a directory)"],
        id="dsn-file-is-a-directory",
    ),
    pytest.param(
        PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', "dsn_file = 3"),
        ["probes[0].dsn_file: must be a file path string"],
        id="dsn-file-not-a-string",
    ),
    pytest.param(
        '[probes]\nname = "api"\ntype = "http"\n',
        ["probes: must be an array of tables, written [[probes]]"],
        id="probes-is-a-table",
    ),
    pytest.param(
        'probes = ["api"]\n',
        ["probes[0]: must be a table"],
        id="probes-entry-not-a-table",
    ),
    pytest.param(
        "daemon = 5\n" + HTTP_PROBE,
        ["daemon: must be a table"],
        id="daemon-not-a-table",
    ),
    pytest.param(
        HTTP_PROBE.replace('channel = "api"', 'channel = "Web-Chat"'),
        ["probes[0].channel: must be 1 to 32 lower-case letters, digits or '_', starting with a letter (e.g. web_form), got 'Web-Chat'"],
        id="bad-channel-name",
    ),
    pytest.param(
        PG_PROBE + 'max_connections_ratio = 1.5\n',
        ["probes[0].max_connections_ratio: Input should be less than or equal to 1 (got 1.5)"],
        id="out-of-range-number",
    ),
    pytest.param(
        PG_PROBE + '[[probes.queries]]\nname = "open_tickets"\nsql = "SELECT 1"\n'
        '[[probes.queries]]\nname = "open_tickets"\nsql = "SELECT 2"\n',
        ["probes[0]: query names must be unique (repeated: open_tickets)"],
        id="duplicate-query-name",
    ),
    pytest.param(
        # Every problem in the file is reported, in file order, not just the first.
        "[daemon]\ninterval = 30\n" + HTTP_PROBE.replace('type = "http"', 'type = "smtp"') + PG_PROBE + "bogus = 1\n",
        [
            'daemon.interval: expected a duration string such as "30s" or "2m", got int',
            f"probes[0].type: unknown probe type 'smtp' (known: {KNOWN})",
            "probes[1].bogus: unknown key",
        ],
        id="several-problems-at-once",
    ),
    pytest.param(
        "[daemon]\nretries = 9\n" + HTTP_PROBE + "retries = -1\n" + HTTP_PROBE.replace('"api"', '"api2"', 1) + 'retries = "2"\n',
        ["daemon.retries: Input should be less than or equal to 5 (got 9)",
         "probes[0].retries: Input should be greater than or equal to 0 (got -1)",
         "probes[1].retries: Input should be a valid integer (got '2')"],
        id="retries-out-of-range-or-not-a-number",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BAD_CONFIGS)
def test_bad_config_reports_exact_problems(tmp_path: Path, body: str, expected: list[str]) -> None:
    path = write_config(tmp_path, body.replace("{tmp}", str(tmp_path)))
    error = load_error(path)
    expected = [problem.replace("{tmp}", str(tmp_path)) for problem in expected]
    assert error.problems == expected
    assert error.path == str(path)
    # Each line of the message names the file, then the problem.
    assert str(error).startswith(f"{path}: ")
    assert str(error) == "\n".join(f"{path}: {problem}" for problem in expected)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    error = load_error(path)
    assert error.problems == ["cannot read the file: No such file or directory"]
    assert str(error) == f"{path}: cannot read the file: No such file or directory"


# --- secrets never appear in errors ---------------------------------------------------------------------------


def _pg_probe_with(dsn: str, *extra_lines: str) -> str:
    return PG_PROBE.replace('"postgresql://postgres@127.0.0.1:5432/postgres"', f'"{dsn}"') + "".join(
        f"{line}\n" for line in extra_lines
    )


@pytest.mark.parametrize(
    ("body", "environ", "expected"),
    [
        pytest.param(
            _pg_probe_with(f"postgresql://canary:{PASSWORD}@db.internal:5432/support", "bogus = 1", "health_checks = \"sometimes\""),
            {},
            ["probes[0].health_checks: Input should be a valid boolean (got 'sometimes')",
             "probes[0].bogus: unknown key"],
            id="valid-dsn-other-errors-in-probe",
        ),
        pytest.param(
            _pg_probe_with(f"mysql://root:{PASSWORD}@db.internal/support"),
            {},
            ["probes[0].dsn: must be a postgresql:// URL"],
            id="bad-dsn-with-password",
        ),
        pytest.param(
            _pg_probe_with("${DATABASE_URL}", "bogus = 1"),
            {"DATABASE_URL": f"host=db.internal user=canary password={PASSWORD}"},
            ["probes[0].dsn: must be a postgresql:// URL", "probes[0].bogus: unknown key"],
            id="bad-dsn-from-environment",
        ),
        pytest.param(
            PG_PROBE.replace('dsn = "postgresql://postgres@', f'dns = "postgresql://postgres:{PASSWORD}@'),
            {},
            ["probes[0].dsn: required key is missing", "probes[0].dns: unknown key; did you mean 'dsn'?"],
            id="dsn-under-a-misspelt-key",
        ),
        pytest.param(
            _pg_probe_with(f"postgresql://canary:{PASSWORD}@db.internal/support").replace(
                'channel = "database"', f'channel = "postgresql://canary:{PASSWORD}@db.internal/support"'
            ),
            {},
            ["probes[0].channel: must be 1 to 32 lower-case letters, digits or '_', starting with a letter (e.g. web_form), got '***'"],
            id="dsn-pasted-into-another-key",
        ),
        pytest.param(
            '[daemon]\nlisten = "${DATABASE_URL}"\n' + _pg_probe_with("${DATABASE_URL}"),
            {"DATABASE_URL": f"postgresql://canary:{PASSWORD}@db/x"},
            ["daemon.listen: must be HOST:PORT (e.g. 127.0.0.1:9465 or [::1]:9465), got '***'"],
            id="dsn-variable-wired-to-listen",
        ),
        pytest.param(
            HTTP_PROBE.replace("http://127.0.0.1:8000/health", f"ftp://canary:{PASSWORD}@files.internal/health"),
            {},
            ["probes[0].url: must be an absolute http:// or https:// URL, got 'ftp://files.internal/health'"],
            id="http-url-with-password-and-bad-scheme",
        ),
    ],
)
def test_secrets_never_appear_in_errors(tmp_path: Path, body: str, environ: dict[str, str], expected: list[str]) -> None:
    assert PASSWORD in body or PASSWORD in "".join(environ.values())
    error = load_error(write_config(tmp_path, body), environ)
    assert error.problems == expected
    assert PASSWORD not in str(error)


def test_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    # Other keys show the bad value ("got ..."); a secret key never does, whatever its type.
    path = write_config(tmp_path, PG_PROBE.replace('"postgresql://postgres@127.0.0.1:5432/postgres"', "987654321"))
    error = load_error(path)
    assert error.problems == ["probes[0].dsn: Input should be a valid string"]
    assert "987654321" not in str(error)


def test_secret_file_contents_never_appear_in_errors(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text(f"mysql://root:{PASSWORD}@db.internal/support\n")
    path = write_config(
        tmp_path, PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', f'dsn_file = "{secret}"')
    )
    error = load_error(path)
    assert error.problems == ["probes[0].dsn: must be a postgresql:// URL"]
    assert PASSWORD not in str(error)


# --- the shipped config ---------------------------------------------------------------------------------------


def test_shipped_config_loads_with_an_empty_environment() -> None:
    config = load(ROOT / "config.toml", {})
    assert config.daemon.listen == "127.0.0.1:9465"
    assert config.daemon.labels == {"environment": "dev"}
    by_name = {probe.name: probe for probe in config.probes}
    api, database = by_name["api-health"], by_name["database"]
    assert isinstance(api, HttpSettings) and isinstance(database, PostgresSettings)
    assert (api.name, api.channel, api.url) == ("api-health", "api", "http://127.0.0.1:8000/health")
    assert (api.interval, api.timeout) == (15.0, 5.0)
    assert api.expect_json == {"status": "healthy", "database": "active"}
    assert (database.name, database.channel) == ("database", "database")
    assert database.dsn.get_secret_value() == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert (database.interval, database.timeout) == (30.0, 5.0)
    assert database.health_checks is True


def test_shipped_config_uses_platform_and_database_urls() -> None:
    environ = {
        "PLATFORM_URL": "https://support.example.com",
        "DATABASE_URL": "postgresql://canary:db-pw-98765@db.example.com:5432/support",
        "CANARY_ENVIRONMENT": "prod",
        "CANARY_LISTEN": "0.0.0.0:9465",
    }
    config = load(ROOT / "config.toml", environ)
    by_name = {probe.name: probe for probe in config.probes}
    api, database = by_name["api-health"], by_name["database"]
    assert isinstance(api, HttpSettings) and isinstance(database, PostgresSettings)
    assert api.url == "https://support.example.com/health"
    assert database.dsn.get_secret_value() == "postgresql://canary:db-pw-98765@db.example.com:5432/support"
    assert database.target() == "postgres db.example.com:5432/support"
    assert config.daemon.labels == {"environment": "prod"}
    assert config.daemon.listen == "0.0.0.0:9465"
    assert "postgresql://canary:db-pw-98765@db.example.com:5432/support" in config.secrets


def test_no_validation_message_shows_a_regular_expression(tmp_path: Path) -> None:
    """Names, channels, steps, queries, SIDs and topics say in words what they must be."""
    body = '''
[[probes]]
name = "-bad"
type = "transaction"
channel = "Web Form"
[[probes.steps]]
name = "Submit"
url = "http://127.0.0.1:1/"
'''
    problems = load_error(write_config(tmp_path, body)).problems
    assert len(problems) == 3, problems
    assert all("must be" in problem and "^" not in problem and "{0," not in problem for problem in problems), problems


# A config is read a [[probes]] table at a time (so `probe run` can reload 10,000 probes between due runs): whatever
# the text, that gives exactly what reading it whole gives, or the same error.
_TRICKY_TOML = {
    "plain": '[daemon]\ninterval = "10s"\n\n[[probes]]\nname = "a"\n\n[[probes]] # second\nname = "b"\n',
    "a table after the probes": '[[probes]]\nname = "a"\n[probes.headers]\nX = "1"\n[[probes]]\nname = "b"\n[daemon]\nx = 1\n',
    "a header inside a multi-line string": '[[probes]]\nname = "a"\nbody = """\n[[probes]]\n"""\n[[probes]]\nname = "b"\n',
    "nested arrays of tables": '[[probes]]\nname = "a"\n[[probes.steps]]\nn = 1\n[[probes.steps]]\nn = 2\n[[probes]]\nname = "b"\n',
    "a table declared twice": '[daemon]\nx = 1\n[[probes]]\nname = "a"\n[daemon]\ny = 2\n[[probes]]\nname = "b"\n',
    "an inline probes array": 'probes = [{ name = "z" }]\n[[probes]]\nname = "a"\n[[probes]]\nname = "b"\n',
    "a sub-table of an earlier table": '[daemon]\nx = 1\n[[probes]]\nname = "a"\n[daemon.labels]\ny = "2"\n[[probes]]\nname = "b"\n',
}


@pytest.mark.parametrize("text", _TRICKY_TOML.values(), ids=_TRICKY_TOML.keys())
def test_reading_a_config_a_probe_at_a_time_gives_what_reading_it_whole_gives(text: str) -> None:
    import tomllib

    from canary.config import _toml_steps, run_steps

    try:
        whole: object = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        whole = str(exc)
    try:
        cut: object = run_steps(_toml_steps(text))
    except tomllib.TOMLDecodeError as exc:
        cut = str(exc)
    assert cut == whole


def test_relative_file_paths_are_the_config_files_neighbours_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "etc" / "canary"
    (home / "secrets").mkdir(parents=True)
    (home / "secrets" / "db").write_text("postgresql://postgres:from-the-file@127.0.0.1:5432/postgres\n")
    config = home / "config.toml"
    config.write_text(PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', 'dsn_file = "secrets/db"')
                      + PG_PROBE.replace('"db"', '"db2"').replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"',
                                                                 'dsn_file = "missing/db"'))
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as raised:
        load_config(config, PROBE_TYPES)
    # The one that exists was found beside the config; the missing one is named where it was looked for.
    assert raised.value.problems == [f"probes[1].dsn_file: cannot read the file '{home}/missing/db' (No such file or directory)"]
    config.write_text(PG_PROBE.replace('dsn = "postgresql://postgres@127.0.0.1:5432/postgres"', 'dsn_file = "secrets/db"'))
    [settings] = load_config(config, PROBE_TYPES).probes
    assert "from-the-file" in settings.secret_values()[0]
