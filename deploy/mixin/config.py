"""The one place a team changes: selectors, thresholds, the SLO and the runbook base URL.

The alerting and recording rules (deploy/prometheus/rules/) and the Grafana dashboards (deploy/grafana/) are
generated from this module, so a threshold changes in one place and a dashboard never queries a series the rules do
not know. Where the platform's runbooks disagree, the threshold is the stricter one.
"""

from __future__ import annotations

# Where the runbook sections live; an alert's runbook_url is RUNBOOK_BASE_URL + "#" + its section's anchor.
RUNBOOK_BASE_URL = "https://github.com/channel-canary/channel-canary/blob/main/deploy/runbooks/README.md"

# Grafana dashboards (deploy/grafana/generate.py): fixed uids, so links, bookmarks and provisioned copies survive a
# regeneration; the tag groups them in Grafana's dashboard list.
DASHBOARD_TAGS = ("channel-canary",)
CHANNEL_HEALTH_DASHBOARD_UID = "channel-canary-health"
CHANNEL_HEALTH_DASHBOARD_TITLE = "Channel canary / Channel health"
PROBE_DETAIL_DASHBOARD_UID = "channel-canary-probe"
PROBE_DETAIL_DASHBOARD_TITLE = "Channel canary / Probe detail"

# Added to every canary selector, e.g. 'job="channel-canary"' or 'environment="prod"'.
SELECTOR = 'job=~".*canary.*"'

# Labels every aggregate keeps: a static label per deployment, and the location a probe ran from.
GROUPING = ("environment", "location", "channel")

# Availability objective of canary runs per channel (critical probes only), over SLO_PERIOD.
SLO_OBJECTIVE = 0.995
SLO_PERIOD = "30d"
# Google SRE workbook, multiwindow multi-burn-rate: (severity, long window, short window, burn-rate factor, for).
BURN_RATE_ALERTS = (
    ("page", "1h", "5m", 14.4, "2m"),
    ("page", "6h", "30m", 6.0, "15m"),
    ("ticket", "3d", "6h", 1.0, "1h"),
)
ERROR_RATIO_WINDOWS = ("5m", "30m", "1h", "6h", "3d", "30d")

# Multi-location quorum: a paging alert needs this many locations failing (1: one location behaves as today).
MIN_FAILING_LOCATIONS = 2

# Severity scheme of every alert: "page" wakes someone, "ticket" waits for working hours.
SEVERITIES = ("page", "ticket")

# Runbook thresholds (deploy/runbooks/ explains each).
THRESHOLDS = {
    "api_latency_p95_warning_seconds": 0.5,
    "api_latency_p95_critical_seconds": 2.0,
    "agent_reply_sla_seconds": 15.0,
    "llm_slow_seconds": 10.0,
    "llm_min_headroom_ratio": 0.1,
    "db_connections_ratio": 0.9,
    "db_long_query_seconds": 5.0,
    "ticket_backlog_warning": 50,
    "ticket_backlog_critical": 200,
    "escalation_ratio_warning": 0.3,
    "escalation_ratio_critical": 0.6,
    "kafka_consumer_lag": 100,
    "gmail_watch_min_remaining_seconds": 24 * 3600,
    "tls_expiry_warning_days": 14,
    "tls_expiry_critical_days": 3,
    "stale_intervals": 3,
}

# Recording rule names: the rules define them, the dashboards and alerts read them. Labels: GROUPING.
ERROR_RATIO = "channel:canary_probe_errors:ratio_rate{window}"  # failed / all runs of critical probes
BURN_RATE = "channel:canary_error_budget:burn_rate{window}"  # ERROR_RATIO / (1 - SLO_OBJECTIVE)
BUDGET_REMAINING = "channel:canary_error_budget:remaining_ratio"  # 1 - ERROR_RATIO over SLO_PERIOD / (1 - objective)
SLO_OBJECTIVE_SERIES = "canary:slo_objective:ratio"  # the objective itself, for dashboards
