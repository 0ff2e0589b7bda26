"""The alerting and recording rules, built from a config (deploy/mixin/config.py, or a copy with overrides).

Everything a team tunes lives in config.py; this module only says what each alert means. Conventions:

- Every alert has the labels `severity` (`page` or `ticket`, config.SEVERITIES) and `channel`, and the annotations
  `summary`, `description` and `runbook_url` (config.RUNBOOK_BASE_URL + "#" + the alert name in lower case).
- Aggregates keep config.GROUPING (plus the probe and a figure's own labels) and drop everything else, so the rules
  do not change with the number of shards or replicas (`instance`, `pod`) a deployment runs.
- A page never comes from a warning-only probe: every per-probe selector of a paging rule has `importance!="warning"`
  (channels: `importance="critical"`); warning probes open tickets through CanaryProbeFailing.
- A page about probes needs a quorum of locations (config.MIN_FAILING_LOCATIONS, or a majority of the locations the
  probe runs from if that is fewer); one location, or no location label at all, is a quorum of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable, Sequence


CRITICAL_CHANNEL = 'importance="critical"'
COMPLETION_PHASE = 'phase="completion"'
NOT_SATURATED = 'reason!="saturated"'  # slots a saturated canary skips are CanarySaturated's


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str
    expr: str
    for_: str
    summary: str
    description: str
    channel: str = "{{ $labels.channel }}"
    labels: Sequence[tuple[str, str]] = ()
    # Inhibited while CanaryPlatformDown fires, for the channels in config.PLATFORM_CHANNELS.
    platform_explains: bool = False
    # A precise page for one cause of a probe's failure: inhibits the generic CanaryProbeFailing of that probe.
    explains_probe_failure: bool = False
    # Judges durations, which a saturated canary stretches: inhibited while CanarySaturated fires in its location.
    slowed_by_saturation: bool = False


@dataclass
class RuleSet:
    """The generated rules of one config: rule groups per file, and the alerts' metadata for Alertmanager."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)


class PromQL(str):
    """An expression: written as a YAML literal block, so it reads as it was laid out."""


def indent(text: str, spaces: int = 2) -> str:
    return "\n".join(" " * spaces + line if line else line for line in text.splitlines())


def number(value: float) -> str:
    """A float as PromQL and YAML should show it: 0.005, not 0.0050000000000000044; 6, not 6.0."""
    value = round(float(value), 12)
    return str(int(value)) if value.is_integer() else repr(value)


class Mixin:
    def __init__(self, cfg: SimpleNamespace) -> None:
        self.cfg = cfg
        self.location = cfg.LOCATION_LABEL
        self.crit = 'importance!="warning"'

    # --- PromQL pieces ----------------------------------------------------------------------------------------------

    def sel(self, *matchers: str) -> str:
        return "{" + ", ".join(m for m in (self.cfg.SELECTOR, *matchers) if m) + "}"

    def keys(self, *extra: str, location: bool = True) -> str:
        labels = [g for g in self.cfg.GROUPING if location or g != self.location]
        if location and self.location not in labels:
            labels.append(self.location)
        return ", ".join(dict.fromkeys([*labels, *extra]))

    def quorum(self, failing: str, every: str, keys: str, value: str | None = None) -> str:
        """`failing` (one series per location) holds in at least min(MIN_FAILING_LOCATIONS, a majority of the
        locations in `every`). The value is the number of failing locations, or `value` (an aggregation such as max)
        of `failing` itself."""
        condition = (
            f"count by ({keys}) (\n{indent(failing)}\n)\n>= on ({keys})\n"
            f"clamp_max(\n  floor(count by ({keys}) (\n{indent(every, 4)}\n  ) / 2) + 1,\n"
            f"  {number(self.cfg.MIN_FAILING_LOCATIONS)}\n)"
        )
        if value is None:
            return condition
        return f"{value} by ({keys}) (\n{indent(failing)}\n)\nand on ({keys})\n(\n{indent(condition)}\n)"

    def success(self, keys: str, *matchers: str) -> str:
        return f"min by ({keys}) (canary_probe_success{self.sel(*matchers)})"

    def failures(self, window: str, *matchers: str) -> str:
        """Failure counters that grew within `window` (only those). A counter first scraped already above 0 (the probe
        failed before the first scrape after a start) has no increase() yet: it counts too, while it is that new."""
        counter = f"canary_probe_failures_total{self.sel(*matchers)}"
        return f"(increase({counter}[{window}]) > 0 or ({counter} > 0 unless {counter} offset {window}))"

    def failing_with(self, keys: str, reason: str, *matchers: str) -> str:
        """The probe fails now, and failed for `reason` (a matcher) within REASON_WINDOW. Value: those failures."""
        return (
            f"sum by ({keys}) ({self.failures(self.cfg.REASON_WINDOW, *matchers, reason)}) > 0\n"
            f"and on ({keys})\n{self.success(keys, *matchers)} == 0"
        )

    def judged_only(self, keys: str, *matchers: str) -> str:
        """Every recent failure was one another alert judges (config.JUDGED_FAILURES)."""
        cfg = self.cfg
        judged = "\nor\n".join(self.failures(cfg.JUDGED_WINDOW, *matchers, j) for j in cfg.JUDGED_FAILURES)
        others = "\nunless\n".join(
            [self.failures(cfg.REASON_WINDOW, *matchers)]
            + [self.failures(cfg.REASON_WINDOW, *matchers, j) for j in cfg.JUDGED_FAILURES]
        )
        return (
            f"sum by ({keys}) (\n{indent(judged)}\n) > 0\n"
            f"unless on ({keys})\nsum by ({keys}) (\n{indent(others)}\n) > 0"
        )

    def page_failing(self, keys: str, *matchers: str) -> str:
        """A critical probe failing for a reason no other alert judges (one series per probe and location)."""
        return (
            f"{self.success(keys, self.crit, *matchers)} == 0\n"
            f"unless on ({keys})\n(\n{indent(self.judged_only(keys, self.crit, *matchers))}\n)"
        )

    # --- annotation pieces ------------------------------------------------------------------------------------------

    def _query_filter(self, keys: str) -> tuple[str, str]:
        names = [k.strip() for k in keys.split(",")]
        selector = self.sel(*(f"{k}=%q" for k in names)).replace("%", "%%").replace("%%q", "%q")
        return selector, " ".join(f"$labels.{k}" for k in names)

    def reasons(self, keys: str) -> str:
        """A template naming the reasons the alert's probe failed for within REASON_WINDOW."""
        selector, args = self._query_filter(keys)
        window = self.cfg.REASON_WINDOW
        query = f"sort_desc(sum by (reason) (increase(canary_probe_failures_total{selector}[{window}])) > 0)"
        return (
            f"{{{{ with printf `{query}` {args} | query }}}} Failure reasons in the last {window}: "
            "{{ range $i, $r := . }}{{ if $i }}, {{ end }}{{ $r.Labels.reason }}{{ end }}.{{ end }}"
        )

    def where(self) -> str:
        """ from LOCATION, when the alert has a location label."""
        return f"{{{{ with $labels.{self.location} }}}} from {{{{ . }}}}{{{{ end }}}}"

    # --- the alerts -------------------------------------------------------------------------------------------------

    def alert_groups(self) -> list[tuple[str, list[Alert]]]:
        return [
            ("canary-platform", self.platform()),
            ("canary-api", self.api()),
            ("canary-web-form", self.web_form()),
            ("canary-database", self.database()),
            ("canary-llm", self.llm()),
            ("canary-email", self.gmail()),
            ("canary-whatsapp", self.whatsapp()),
            ("canary-kafka", self.kafka()),
            ("canary-cache", self.redis()),
            ("canary-tls", self.tls()),
            ("canary-self", self.canary()),
        ]

    def platform(self) -> list[Alert]:
        cfg = self.cfg
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)
        group, group_q = self.keys(), self.keys(location=False)
        platform = self.success(probe, self.crit, cfg.PLATFORM_SELECTOR)
        channel_up = f"min by ({group}) (canary_channel_up{self.sel(CRITICAL_CHANNEL)})"
        platform_says_down = f"min by ({group}) (canary_platform_channel_up{self.sel()}) == 0"
        channel_failing = (
            f"{channel_up} == 0\nand on ({group}) (\n"
            f"  count by ({group}) (\n{indent(self.page_failing(probe), 4)}\n  )\n"
            f"  or\n  {platform_says_down}\n)"
        )
        listing_selector, listing_args = self._query_filter(group_q)
        window = cfg.REASON_WINDOW
        listing = (
            f"{{{{ with printf `sort_desc(sum by (probe, reason) (increase(canary_probe_failures_total"
            f"{listing_selector}[{window}])) > 0)` {listing_args} | query }}}}Failing in the last {window}: "
            "{{ range $i, $r := . }}{{ if $i }}, {{ end }}{{ $r.Labels.probe }} ({{ $r.Labels.reason }}){{ end }}."
            f"{{{{ else }}}}No canary probe of the channel failed in the last {window}: the platform's own /health "
            "reports it down.{{ end }}"
        )
        channels = ", ".join(cfg.PLATFORM_CHANNELS)
        return [
            Alert(
                "CanaryPlatformDown", "page", self.quorum(f"{platform} == 0", platform, probe_q), "2m",
                "The platform is down: its health check {{ $labels.probe }} fails",
                "{{ $labels.probe }}, the platform's own health check, has failed from {{ $value }} location(s) for "
                f"2 minutes.{self.reasons(probe_q)} Every channel served through the platform's API ({channels}) "
                "is down with it: their alerts are inhibited while this one fires.",
            ),
            Alert(
                "CanaryChannelDown", "page", self.quorum(channel_failing, channel_up, group_q), "5m",
                "Channel {{ $labels.channel }} is down",
                "The {{ $labels.channel }} channel (importance critical) has been down from {{ $value }} location(s) "
                f"for 5 minutes. {listing}",
                platform_explains=True,
            ),
            Alert(
                "CanaryProbeFailing", "page",
                self.quorum(self.page_failing(probe), self.success(probe, self.crit), probe_q), "5m",
                "Probe {{ $labels.probe }} of channel {{ $labels.channel }} is failing",
                "The critical probe {{ $labels.probe }} ({{ $labels.channel }}) has failed from {{ $value }} "
                f"location(s) for 5 minutes.{self.reasons(probe_q)}",
                platform_explains=True,
            ),
            Alert(
                "CanaryProbeFailing", "ticket", f"{self.success(probe)} == 0", "15m",
                "Probe {{ $labels.probe }} of channel {{ $labels.channel }} is failing",
                "{{ $labels.probe }} ({{ $labels.channel }})" + self.where() + " has failed for 15 minutes "
                f"(canary_probe_success = {{{{ $value }}}}).{self.reasons(probe)} A ticket, not a page: the probe is "
                "warning-only, fails from fewer locations than a page needs, or fails only on a limit another alert "
                "judges.",
                platform_explains=True,
            ),
        ]

    def api(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        group, group_q = self.keys(), self.keys(location=False)

        def p95(window: str, *matchers: str) -> str:
            return (
                f"histogram_quantile(0.95, sum by ({group}, le) (\n"
                f"  rate(canary_probe_latency_seconds_bucket{self.sel(cfg.API_SELECTOR, *matchers)}[{window}])\n))"
            )

        warning, critical = t["api_latency_p95_warning_seconds"], t["api_latency_p95_critical_seconds"]
        text = (
            "The API's p95 latency as the canary sees it (a fresh connection and request, channel "
            "{{ $labels.channel }}" + self.where() + ") is {{ $value | humanizeDuration }} over {window}, above {limit}."
        )
        page_text = (
            "The API's p95 latency as the canary sees it (a fresh connection and request, channel "
            "{{ $labels.channel }}) is up to {{ $value | humanizeDuration }} over {window} from a quorum of "
            "locations, above {limit}."
        )
        return [
            Alert(
                "CanaryApiLatencyHigh", "ticket", f"{p95('10m')} > {number(warning)}", "10m",
                "API p95 latency above " + seconds(warning),
                text.replace("{window}", "10 minutes").replace("{limit}", seconds(warning)),
                platform_explains=True, slowed_by_saturation=True,
            ),
            Alert(
                "CanaryApiLatencyHigh", "page",
                self.quorum(f"{p95('5m', self.crit)} > {number(critical)}", p95("5m", self.crit), group_q, "max"),
                "5m", "API p95 latency above " + seconds(critical),
                page_text.replace("{window}", "5 minutes").replace("{limit}", seconds(critical)),
                platform_explains=True, slowed_by_saturation=True,
            ),
        ]

    def web_form(self) -> list[Alert]:
        cfg = self.cfg
        sla = cfg.THRESHOLDS["agent_reply_sla_seconds"]
        probe = self.keys("probe")
        phase = f'phase="{cfg.AGENT_REPLY_PHASE}"'
        expr = (
            f"max by ({probe}) (\n  quantile_over_time(0.9, canary_probe_phase_duration_seconds"
            f"{self.sel(cfg.WEB_FORM_SELECTOR, phase)}[30m])\n) >= {number(sla)}"
        )
        return [
            Alert(
                "CanaryWebFormAgentReplySlow", "ticket", expr, "5m",
                f"The AI agent misses its {seconds(sla)} reply SLA on the web form",
                "{{ $labels.probe }}" + self.where() + f": more than one in ten of the agent's replies to the web-form "
                f"canary in the last 30 minutes took {seconds(sla)} or longer, or never came (90th percentile "
                "{{ $value | humanizeDuration }}; a reply that never came counts as the whole wait). The tier-1 "
                f"promise is a reply within {seconds(sla)}.",
                platform_explains=True, slowed_by_saturation=True,
            ),
        ]

    def database(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        db = cfg.DATABASE_SELECTOR
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)
        query, query_q = self.keys("probe", "query"), self.keys("probe", "query", location=False)
        connect = self.failing_with(probe, 'reason=~"connect|auth|timeout|dns|tls"', db, self.crit)

        def figure(name: str, *matchers: str, keys: str = probe) -> str:
            return f"max by ({keys}) (canary_probe_{name}{self.sel(db, *matchers)})"

        def business(name: str, query_name: str, limit: float, severity: str) -> str:
            matcher = f'query="{query_name}"'
            if severity == "ticket":
                return f"{figure('query_value', matcher, keys=query)} > {number(limit)}"
            value = figure("query_value", matcher, self.crit, keys=query)
            return self.quorum(f"{value} > {number(limit)}", value, query_q, "max")

        backlog, escalation = cfg.TICKET_BACKLOG_QUERY, cfg.ESCALATION_RATIO_QUERY
        alerts = [
            Alert(
                "CanaryDatabaseDown", "page", self.quorum(connect, self.success(probe, db, self.crit), probe_q), "2m",
                "PostgreSQL refuses the canary's connections",
                "{{ $labels.probe }} cannot connect to PostgreSQL (reason connect, auth, timeout, dns or tls) from "
                f"{{{{ $value }}}} location(s) for 2 minutes.{self.reasons(probe_q)} The platform's API needs the "
                "database: expect CanaryPlatformDown too.",
                explains_probe_failure=True,
            ),
            Alert(
                "CanaryDatabaseConnectionsHigh", "ticket",
                f"max by ({probe}) (\n  canary_probe_postgres_connections{self.sel(db)}\n  /\n"
                f"  canary_probe_postgres_max_connections{self.sel(db)}\n) > {number(t['db_connections_ratio'])}",
                "5m", "PostgreSQL connections near max_connections",
                "{{ $labels.probe }}" + self.where() + ": {{ $value | humanizePercentage }} of PostgreSQL's "
                f"max_connections are in use (limit {percent(t['db_connections_ratio'])}); new connections will be "
                "refused soon.",
            ),
            Alert(
                "CanaryDatabaseLongQueries", "ticket",
                f"{figure('postgres_long_running_queries')} > {number(t['db_long_queries'])}", "5m",
                f"PostgreSQL queries running longer than {seconds(t['db_long_query_seconds'])}",
                "{{ $labels.probe }}" + self.where() + ": {{ $value }} queries have been running longer than "
                f"{seconds(t['db_long_query_seconds'])} (the probe's long_query_threshold) for 5 minutes.",
            ),
            Alert(
                "CanaryDatabaseLocksWaiting", "ticket",
                f"{figure('postgres_ungranted_locks')} > {number(t['db_ungranted_locks'])}", "5m",
                "PostgreSQL lock requests are waiting",
                "{{ $labels.probe }}" + self.where() + ": {{ $value }} lock requests have been waiting to be granted "
                "for 5 minutes.",
            ),
        ]
        for name, query_name, level, severity, for_, what in (
            ("CanaryTicketBacklogHigh", backlog, "ticket_backlog_warning", "ticket", "15m", "open tickets"),
            ("CanaryTicketBacklogHigh", backlog, "ticket_backlog_critical", "page", "15m", "open tickets"),
            ("CanaryEscalationRatioHigh", escalation, "escalation_ratio_warning", "ticket", "10m",
             "tickets escalated to a human over 7 days"),
            ("CanaryEscalationRatioHigh", escalation, "escalation_ratio_critical", "page", "10m",
             "tickets escalated to a human over 7 days"),
        ):
            limit = t[level]
            ratio = "ratio" in level
            shown = "{{ $value | humanizePercentage }}" if ratio else "{{ $value }}"
            limit_text = percent(limit) if ratio else number(limit)
            where = "" if severity == "page" else self.where()
            alerts.append(Alert(
                name, severity, business(name, query_name, limit, severity), for_,
                f"Too many {what}: above {limit_text}",
                "{{ $labels.probe }}" + where + f" reads {{{{ $labels.query }}}} = {shown} (its SQL in the "
                f"postgres probe's queries), above {limit_text} for {duration_words(for_)}.",
            ))
        return alerts

    def llm(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        llm = cfg.LLM_SELECTOR
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)

        def page(name: str, reason: str, summary: str, text: str) -> Alert:
            failing = self.failing_with(probe, f'reason="{reason}"', llm, self.crit)
            return Alert(
                name, "page", self.quorum(failing, self.success(probe, llm, self.crit), probe_q), "3m", summary,
                "{{ $labels.probe }} fails with reason " + reason + " from {{ $value }} location(s) for 3 minutes: "
                + text, explains_probe_failure=True,
            )

        slow = t["llm_slow_seconds"]
        return [
            page("CanaryLLMAuthFailing", "auth", "The LLM provider refuses the agent's API key",
                 "the provider refuses the API key (revoked, rotated or out of credit), so the AI agent cannot answer."),
            page("CanaryLLMModelMissing", "model_missing", "The AI agent's LLM model is no longer served",
                 "the provider no longer lists or serves the agent's model; set a served model in the agent's config."),
            Alert(
                "CanaryLLMRateLimited", "ticket", self.failing_with(probe, 'reason="rate_limited"', llm), "10m",
                "The LLM provider rate-limits the canary",
                "{{ $labels.probe }}" + self.where() + " has been rate limited (HTTP 429, or quota headroom below "
                f"{percent(t['llm_min_headroom_ratio'])}) for 10 minutes: {{{{ $value }}}} rate-limited runs in the "
                f"last {cfg.REASON_WINDOW}. The platform's agent shares the quota.",
            ),
            Alert(
                "CanaryLLMHeadroomLow", "ticket",
                f"min by ({self.keys('probe', 'kind')}) (canary_probe_llm_ratelimit_headroom_ratio{self.sel(llm)})"
                f" < {number(t['llm_min_headroom_ratio'])}", "10m",
                "LLM quota headroom is low",
                "{{ $labels.probe }}" + self.where() + ": only {{ $value | humanizePercentage }} of the provider's "
                f"{{{{ $labels.kind }}}} quota is left in its window (limit {percent(t['llm_min_headroom_ratio'])}) "
                "for 10 minutes.",
            ),
            Alert(
                "CanaryLLMSlow", "ticket",
                f"max by ({probe}) (canary_probe_phase_duration_seconds{self.sel(llm, COMPLETION_PHASE)})"
                f" > {number(slow)}", "10m",
                f"LLM completions take longer than {seconds(slow)}",
                "{{ $labels.probe }}" + self.where() + ": a 1-token completion took {{ $value | humanizeDuration }}, "
                f"above {seconds(slow)}, for 10 minutes.",
                slowed_by_saturation=True,
            ),
            Alert(
                "CanaryLLMProviderOutage", "ticket",
                f"max by ({probe}) (canary_probe_statuspage_indicator{self.sel(cfg.PROVIDER_STATUS_SELECTOR)})"
                f" >= {number(t['statuspage_outage_indicator'])}", "5m",
                "The LLM provider reports a major outage",
                "{{ $labels.probe }}" + self.where() + ": the provider's status page has reported indicator "
                "{{ $value }} (2 major, 3 critical) for 5 minutes. Whether the agent's own path works is the llm "
                "probe's job: it pages if it fails.",
            ),
        ]

    def gmail(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        gmail = cfg.GMAIL_SELECTOR
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)
        failing = self.failing_with(probe, 'reason="invalid_grant"', gmail, self.crit)
        remaining = t["gmail_watch_min_remaining_seconds"]
        return [
            Alert(
                "CanaryGmailInvalidGrant", "page",
                self.quorum(failing, self.success(probe, gmail, self.crit), probe_q), "2m",
                "Gmail refuses the refresh token: a human must consent again",
                "{{ $labels.probe }} fails with reason invalid_grant from {{ $value }} location(s): Google refuses the "
                "platform's refresh token (revoked, expired, or the consent was withdrawn). No email is read until "
                "someone signs in and consents again; no retry will fix it.",
                explains_probe_failure=True,
            ),
            Alert(
                "CanaryGmailWatchExpiring", "ticket",
                f"min by ({probe}) (canary_probe_gmail_watch_expiry_timestamp_seconds{self.sel(gmail)} > 0)"
                f" - time() < {number(remaining)}", "30m",
                "The Gmail push watch expires in less than " + seconds(remaining),
                "{{ $labels.probe }}" + self.where() + ": the Gmail Pub/Sub watch expires in "
                "{{ $value | humanizeDuration }} and has not been renewed. Gmail stops pushing new mail silently "
                "when it lapses.",
            ),
        ]

    def whatsapp(self) -> list[Alert]:
        cfg = self.cfg
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)
        webhook = self.failing_with(probe, 'reason!~"insecure|cleanup"', cfg.WHATSAPP_SELECTOR, self.crit)
        active = f"max by ({probe}) (canary_probe_twilio_account_active{self.sel(cfg.TWILIO_SELECTOR, self.crit)})"
        return [
            Alert(
                "CanaryWhatsAppWebhookFailing", "page",
                self.quorum(webhook, self.success(probe, cfg.WHATSAPP_SELECTOR, self.crit), probe_q), "3m",
                "The WhatsApp webhook does not take Twilio's messages",
                "{{ $labels.probe }}: the platform's WhatsApp webhook has not answered a correctly signed message from "
                f"{{{{ $value }}}} location(s) for 3 minutes.{self.reasons(probe_q)} Reason auth means the signature "
                "was refused: the Twilio auth token or the public URL changed.",
                platform_explains=True, explains_probe_failure=True,
            ),
            Alert(
                "CanaryTwilioAccountSuspended", "page", self.quorum(f"{active} == 0", active, probe_q), "2m",
                "The Twilio account is not active",
                "{{ $labels.probe }}: Twilio reports the account as suspended or closed, seen from {{ $value }} "
                "location(s) for 2 minutes. No WhatsApp message is sent or received until it is active again.",
                explains_probe_failure=True,
            ),
            Alert(
                "CanaryWhatsAppSignatureNotVerified", "page",
                self.failing_with(probe, 'reason="insecure"', cfg.WHATSAPP_SELECTOR, self.crit), "",
                "SECURITY: the WhatsApp webhook accepts forged or unsigned requests",
                "{{ $labels.probe }}" + self.where() + " (reason insecure, {{ $value }} time(s) in the last "
                f"{cfg.REASON_WINDOW}): the platform accepted a request with a forged X-Twilio-Signature or none at "
                "all, so anyone can post messages as any WhatsApp user. A security incident: one location is enough.",
                explains_probe_failure=True,
            ),
        ]

    def kafka(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        group, group_q = self.keys("probe", "group"), self.keys("probe", "group", location=False)
        topic = self.keys("probe", "topic")

        def status(*matchers: str, keys: str = group) -> str:
            return (f"max by ({keys}) (canary_probe_kafka_consumer_group_status"
                    f"{self.sel(cfg.KAFKA_LAG_SELECTOR, *matchers)})")

        def age(*matchers: str) -> str:
            return (f"max by ({group}) (canary_probe_kafka_consumer_group_lag_seconds"
                    f"{self.sel(cfg.KAFKA_LAG_SELECTOR, *matchers)})")

        warning, critical = t["kafka_lag_warning_seconds"], t["kafka_lag_critical_seconds"]
        waited = ("the oldest unconsumed message of consumer group {{ $labels.group }} has waited "
                  "{{ $value | humanizeDuration }}")
        stalled = "status {{ $value }} (2 STALL: committed offsets stopped moving while lag stays; 3 STOP: no "
        stalled += "progress for the probe's stop_after)"
        return [
            Alert(
                "CanaryKafkaMessagesWaiting", "ticket", f"{age()} > {number(warning)}", "5m",
                "Messages for consumer group {{ $labels.group }} wait longer than " + seconds(warning),
                "{{ $labels.probe }}" + self.where() + ": " + waited + ", and for 5 minutes every run has found one "
                f"older than {seconds(warning)} (the agent reply SLA): customers are not getting replies in time.",
            ),
            Alert(
                "CanaryKafkaMessagesWaiting", "page",
                self.quorum(f"{age(self.crit)} > {number(critical)}", age(self.crit), group_q, "max"), "2m",
                "Messages for consumer group {{ $labels.group }} wait longer than " + seconds(critical),
                "{{ $labels.probe }}: " + waited + f"; for 2 minutes a quorum of locations has found one older than "
                f"{seconds(critical)}: customers are not getting replies, and Kafka is critical here.",
            ),
            Alert(
                "CanaryKafkaConsumerLagHigh", "ticket",
                f"max by ({group}) (canary_probe_kafka_consumer_group_lag{self.sel(cfg.KAFKA_LAG_SELECTOR)})"
                f" > {number(t['kafka_consumer_lag'])}", "10m",
                f"Kafka consumer group {{{{ $labels.group }}}} lags more than {number(t['kafka_consumer_lag'])} messages",
                "{{ $labels.probe }}" + self.where() + ": consumer group {{ $labels.group }} is {{ $value }} messages "
                f"behind (limit {number(t['kafka_consumer_lag'])}) for 10 minutes: tickets arrive late.",
            ),
            Alert(
                "CanaryKafkaConsumerGroupStalled", "ticket", f"{status()} >= 2", "5m",
                "Kafka consumer group {{ $labels.group }} is stalled",
                "{{ $labels.probe }}" + self.where() + ": consumer group {{ $labels.group }} has " + stalled
                + " for 5 minutes: messages are not being processed.",
            ),
            Alert(
                "CanaryKafkaConsumerGroupStalled", "page",
                self.quorum(f"{status(self.crit)} >= 2", status(self.crit), group_q, "max"), "5m",
                "Kafka consumer group {{ $labels.group }} is stalled",
                "{{ $labels.probe }}: consumer group {{ $labels.group }} has " + stalled + " from a quorum of "
                "locations for 5 minutes: messages are not being processed, and Kafka is critical here.",
            ),
            Alert(
                "CanaryKafkaDeadLetters", "ticket",
                f"max by ({topic}) (\n  max_over_time(canary_probe_kafka_dlq_growth"
                f"{self.sel(cfg.KAFKA_DLQ_SELECTOR)}[30m])\n) > {number(t['kafka_dlq_growth'])}", "",
                "New messages in dead-letter topic {{ $labels.topic }}",
                "{{ $labels.probe }}" + self.where() + ": {{ $labels.topic }} grew by up to {{ $value }} messages in "
                "one run within the last 30 minutes: a message the workers cannot process (a poison pill).",
            ),
        ]

    def redis(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        redis = cfg.REDIS_SELECTOR
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)
        failing = self.failing_with(probe, 'reason=~"connect|auth|timeout"', redis, self.crit)
        return [
            Alert(
                "CanaryRedisDown", "page", self.quorum(failing, self.success(probe, redis, self.crit), probe_q), "2m",
                "Redis refuses the canary's connections",
                "{{ $labels.probe }} cannot connect to Redis or get a PING answered (reason connect, auth or timeout) "
                f"from {{{{ $value }}}} location(s) for 2 minutes.{self.reasons(probe_q)}",
                explains_probe_failure=True,
            ),
            Alert(
                "CanaryRedisMemoryHigh", "ticket",
                f"max by ({probe}) (\n  canary_probe_redis_used_memory_bytes{self.sel(redis)}\n  /\n"
                f"  (canary_probe_redis_maxmemory_bytes{self.sel(redis)} > 0)\n)"
                f" > {number(t['redis_memory_ratio'])}", "10m",
                "Redis memory near maxmemory",
                "{{ $labels.probe }}" + self.where() + ": Redis uses {{ $value | humanizePercentage }} of its maxmemory "
                f"(limit {percent(t['redis_memory_ratio'])}); at the limit it evicts keys or refuses writes.",
            ),
        ]

    def tls(self) -> list[Alert]:
        cfg, t = self.cfg, self.cfg.THRESHOLDS
        probe, probe_q = self.keys("probe"), self.keys("probe", location=False)

        def expiry(*matchers: str) -> str:
            return (f"min by ({probe}) (canary_probe_tls_certificate_expiry_timestamp_seconds"
                    f"{self.sel(cfg.TLS_SELECTOR, *matchers)})")

        warning, critical = t["tls_expiry_warning_days"], t["tls_expiry_critical_days"]
        text = ("{{ $labels.probe }}{where}: the TLS certificate (the earliest expiry in the served chain) expires in "
                "{{ $value | humanizeDuration }}, less than {days} days; cert-manager should have renewed it.")
        return [
            Alert(
                "CanaryTLSCertificateExpiring", "ticket", f"{expiry()} - time() < {number(warning)} * 86400", "1h",
                f"A TLS certificate expires in less than {number(warning)} days",
                text.replace("{where}", self.where()).replace("{days}", number(warning)),
            ),
            Alert(
                "CanaryTLSCertificateExpiring", "page",
                self.quorum(f"{expiry(self.crit)} - time() < {number(critical)} * 86400", expiry(self.crit),
                            probe_q, "min"), "10m",
                f"A TLS certificate expires in less than {number(critical)} days",
                text.replace("{where}", "").replace("{days}", number(critical)),
            ),
        ]

    def canary(self) -> list[Alert]:
        t = self.cfg.THRESHOLDS
        mine = (("component", "canary"),)
        stale = number(t["stale_intervals"])
        return [
            Alert(
                "CanaryTargetDown", "page", f"up{self.sel()} == 0", "5m",
                "The canary {{ $labels.instance }} cannot be scraped",
                "Prometheus has failed to scrape {{ $labels.instance }} (job {{ $labels.job }}, up = {{ $value }}) "
                "for 5 minutes. Its probes are not watched: their alerts resolve or never fire while it is down, so "
                "the platform may be down unnoticed. The canary's own alerts for this target are inhibited.",
                channel="canary", labels=mine,
            ),
            Alert(
                "CanaryTargetMissing", "page", f"absent(up{self.sel()})", "10m",
                "No canary target is scraped at all",
                f"No series up{self.sel()} for 10 minutes (absent = {{{{ $value }}}}): Prometheus has no canary "
                "target (a removed deployment, a broken service discovery, or a changed SELECTOR in "
                "deploy/mixin/config.py). Nothing watches the platform.",
                channel="canary", labels=mine,
            ),
            Alert(
                "CanaryProbeStale", "ticket",
                f"time() - canary_probe_last_run_timestamp_seconds{self.sel()}\n"
                f"> {stale} * canary_probe_interval_seconds{self.sel()}", "2m",
                "Probe {{ $labels.probe }} has not run for " + stale + " intervals",
                "{{ $labels.probe }} ({{ $labels.channel }}) on {{ $labels.instance }} last finished a run "
                "{{ $value | humanizeDuration }} ago, more than " + stale + " of its intervals: its scheduler is "
                "stuck or its runs hang, so its other alerts see an old result.",
                labels=mine,
            ),
            Alert(
                "CanaryConfigReloadFailed", "ticket", f"canary_config_last_reload_successful{self.sel()} == 0", "5m",
                "The canary's last config reload failed",
                "{{ $labels.instance }} refused its last config reload (canary_config_last_reload_successful = "
                "{{ $value }}) 5 minutes ago or more: it still runs the previous config. The daemon's log names the "
                "file, key and problem.",
                channel="canary", labels=mine,
            ),
            Alert(
                "CanaryRunsSkipped", "ticket",
                f"increase(canary_scheduler_skipped_runs_total{self.sel(NOT_SATURATED)}[15m]) > 0",
                "15m", "The canary skips scheduled runs",
                "{{ $labels.instance }} skipped {{ $value }} scheduled runs in the last 15 minutes, and has kept "
                "skipping for 15 minutes: runs outlast their interval, so probes run less often than configured.",
                channel="canary", labels=mine,
            ),
            Alert(
                "CanaryOrphanedObjects", "ticket",
                f"canary_orphaned_objects{self.sel()} > {number(t['orphaned_objects'])}", self.cfg.ORPHANED_OBJECTS_FOR,
                "Synthetic objects of probe {{ $labels.probe }} are left on the platform",
                "{{ $labels.instance }} holds {{ $value }} synthetic objects (tickets) that probe {{ $labels.probe }} "
                f"created on the platform and has not removed for {duration_words(self.cfg.ORPHANED_OBJECTS_FOR)}: the "
                "platform refuses their cleanup, or the probe is no longer configured. Until removed they show up in "
                "the platform's queues and reports as real tickets. The daemon's log says why each removal failed.",
                channel="canary", labels=mine,
            ),
            Alert(
                "CanarySaturated", "ticket",
                f"canary_saturation_ratio{self.sel()} > {number(t['saturation_ratio'])}", "2m",
                "The canary {{ $labels.instance }} cannot keep up with its probes",
                "{{ $labels.instance }} has been saturated for 2 minutes (canary_saturation_ratio = {{ $value }}): its "
                "event loop runs behind its timers, so it skips slots it could not finish and calls a run that times out "
                "meanwhile starved, which is no verdict and pages nobody. Until it catches up, the alerts that judge "
                "durations from its location and its own staleness and skipped-run alerts are inhibited: one ticket, not "
                "a page per channel. Give it more CPU, or split its probes into shards.",
                channel="canary", labels=mine,
            ),
        ]

    # --- SLO ------------------------------------------------------------------------------------------------------

    def slo(self) -> tuple[list[dict[str, Any]], list[Alert]]:
        cfg = self.cfg
        group, group_q = self.keys(), self.keys(location=False)
        budget = 1 - cfg.SLO_OBJECTIVE
        records: list[dict[str, Any]] = [
            {"record": cfg.SLO_OBJECTIVE_SERIES, "expr": PromQL(f"vector({number(cfg.SLO_OBJECTIVE)})")},
        ]
        for window in cfg.ERROR_RATIO_WINDOWS:
            failed = "canary_probe_runs_total" + self.sel(self.crit, 'result="failure"')
            every = "canary_probe_runs_total" + self.sel(self.crit)
            records.append({
                "record": cfg.ERROR_RATIO.format(window=window),
                "expr": PromQL(f"sum by ({group}) (rate({failed}[{window}]))\n/\nsum by ({group}) (rate({every}[{window}]))"),
            })
        for window in cfg.ERROR_RATIO_WINDOWS:
            records.append({
                "record": cfg.BURN_RATE.format(window=window),
                "expr": PromQL(f"{cfg.ERROR_RATIO.format(window=window)} / {number(budget)}"),
            })
        records.append({
            "record": cfg.BUDGET_REMAINING,
            "expr": PromQL(f"1 - {cfg.ERROR_RATIO.format(window=cfg.SLO_PERIOD)} / {number(budget)}"),
        })
        alerts = []
        for severity, long, short, factor, for_ in cfg.BURN_RATE_ALERTS:
            burning = (
                f"{cfg.BURN_RATE.format(window=long)} > {number(factor)}\n"
                f"and\n{cfg.BURN_RATE.format(window=short)} > {number(factor)}"
            )
            if severity == "page":
                expr = self.quorum(burning, cfg.BURN_RATE.format(window=long), group_q, "max")
                where = ""
            else:
                expr, where = burning, self.where()
            period_share = f"{number(factor)}x"
            alerts.append(Alert(
                "CanaryErrorBudgetBurn", severity, expr, for_,
                f"Channel {{{{ $labels.channel }}}} burns its error budget {period_share} too fast ({long} and {short})",
                "Canary runs of the {{ $labels.channel }} channel" + where + " fail at {{ $value | humanize }} times "
                f"the rate the {percent(cfg.SLO_OBJECTIVE)} objective allows, over both {long} and {short} (limit "
                f"{number(factor)}); at this rate the {cfg.SLO_PERIOD} error budget lasts "
                f"{budget_lasts(cfg.SLO_PERIOD, factor)}.",
                labels=(("long_window", long), ("short_window", short)),
                platform_explains=True,
            ))
        return records, alerts

    # --- the whole ------------------------------------------------------------------------------------------------

    def build(self) -> RuleSet:
        rules = RuleSet()
        groups = []
        for name, alerts in self.alert_groups():
            groups.append({"name": name, "rules": [self.rule(a) for a in alerts]})
            rules.alerts += alerts
        rules.files["canary-alerts.yml"] = groups
        records, slo_alerts = self.slo()
        rules.alerts += slo_alerts
        rules.files["canary-slo.yml"] = [
            {"name": "canary-slo-recording", "rules": records},
            {"name": "canary-slo-alerts", "rules": [self.rule(a) for a in slo_alerts]},
        ]
        return rules

    def rule(self, alert: Alert) -> dict[str, Any]:
        assert alert.severity in self.cfg.SEVERITIES, alert
        rule: dict[str, Any] = {"alert": alert.name, "expr": PromQL(alert.expr)}
        if alert.for_:
            rule["for"] = alert.for_
        rule["labels"] = {"severity": alert.severity, "channel": alert.channel, **dict(alert.labels)}
        rule["annotations"] = {
            "summary": alert.summary,
            "description": alert.description,
            "runbook_url": f"{self.cfg.RUNBOOK_BASE_URL}#{anchor(alert.name)}",
        }
        return rule


def anchor(alert_name: str) -> str:
    """The runbook section of an alert: deploy/runbooks/README.md has a heading named after it."""
    return alert_name.lower()


def seconds(value: float) -> str:
    value = float(value)
    if value >= 86400 and value % 86400 == 0:
        return f"{int(value // 86400)}d" if value > 86400 else "24h"
    if value >= 3600 and value % 3600 == 0:
        return f"{int(value // 3600)}h"
    return f"{number(value * 1000)}ms" if value < 1 else f"{number(value)}s"


def percent(ratio: float) -> str:
    return f"{number(ratio * 100)}%"


def duration_words(duration: str) -> str:
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    return f"{duration[:-1]} {units[duration[-1]]}"


def budget_lasts(period: str, factor: float) -> str:
    hours = {"d": 24, "h": 1}[period[-1]] * float(period[:-1]) / factor
    return f"{number(round(hours / 24, 1))} days" if hours >= 48 else f"{number(round(hours, 1))} hours"


def alertmanager_config(cfg: SimpleNamespace, alerts: Iterable[Alert]) -> dict[str, Any]:
    """The example Alertmanager config: a receiver per severity, grouped by channel, and the inhibitions."""
    alerts = list(alerts)
    receivers = cfg.ALERTMANAGER_RECEIVERS

    def names(selected: Iterable[Alert]) -> str:
        return "|".join(dict.fromkeys(a.name for a in selected))

    explained = names(a for a in alerts if a.platform_explains)
    precise = names(a for a in alerts if a.explains_probe_failure)
    slowed = names(a for a in alerts if a.slowed_by_saturation)
    channels = "|".join(cfg.PLATFORM_CHANNELS)
    grouping = [g for g in cfg.GROUPING if g != cfg.LOCATION_LABEL]  # what a quorum page keeps
    deployment = [g for g in grouping if g != "channel"]  # e.g. environment: the platform of one deployment
    return {
        "route": {
            "receiver": receivers["ticket"],
            "group_by": list(cfg.ALERTMANAGER_GROUP_BY),
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "12h",
            "routes": [
                {"matchers": ['severity="page"'], "receiver": receivers["page"], "repeat_interval": "1h"},
                {"matchers": ['severity="ticket"'], "receiver": receivers["ticket"], "repeat_interval": "24h"},
            ],
        },
        "receivers": [
            {"name": receivers["page"], "webhook_configs": [
                {"url": "https://pager.example.invalid/v1/channel-canary", "send_resolved": True}]},
            {"name": receivers["ticket"], "webhook_configs": [
                {"url": "https://tickets.example.invalid/v1/channel-canary", "send_resolved": True}]},
        ],
        "inhibit_rules": [
            {   # the platform is down: its channels' alerts are consequences (one page, not six)
                "source_matchers": ['alertname="CanaryPlatformDown"'],
                "target_matchers": [f'alertname=~"{explained}"', f'channel=~"{channels}"'],
                "equal": deployment,
            },
            {   # the canary cannot be scraped: its other alerts about itself are consequences
                "source_matchers": ['alertname="CanaryTargetDown"'],
                "target_matchers": ['component="canary"', 'alertname!="CanaryTargetDown"'],
                "equal": ["job", "instance"],
            },
            {   # the canary is saturated: the durations it measures are stretched by its own lag
                "source_matchers": ['alertname="CanarySaturated"'],
                "target_matchers": [f'alertname=~"{slowed}"'],
                "equal": [g for g in cfg.GROUPING if g != "channel"],  # the same deployment and location
            },
            {   # ...and its probes go stale and its slots are skipped because of it
                "source_matchers": ['alertname="CanarySaturated"'],
                "target_matchers": ['component="canary"', 'alertname=~"CanaryProbeStale|CanaryRunsSkipped"'],
                "equal": ["job", "instance"],
            },
            {   # the page of an alert makes its ticket redundant
                "source_matchers": ['severity="page"'],
                "target_matchers": ['severity="ticket"'],
                "equal": ["alertname", *grouping, "probe"],
            },
            {   # a precise page for a probe's failure makes the generic one redundant
                "source_matchers": [f'alertname=~"{precise}"', 'severity="page"'],
                "target_matchers": ['alertname="CanaryProbeFailing"'],
                "equal": [*grouping, "probe"],
            },
        ],
    }
