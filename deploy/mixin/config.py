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
# The static label naming where a probe ran from; paging alerts count failing locations (MIN_FAILING_LOCATIONS).
LOCATION_LABEL = "location"

# Which probes the alerts read, inside SELECTOR. The platform's own health check: while it fails the platform is down,
# and the alerts of PLATFORM_CHANNELS (all served through its API) are inhibited in Alertmanager.
PLATFORM_SELECTOR = 'probe="api-health"'
PLATFORM_CHANNELS = ("api", "web_form", "whatsapp", "email")
API_SELECTOR = 'channel="api", type="http"'  # API latency: the http probes of the api channel
WEB_FORM_SELECTOR = 'channel="web_form", type="transaction"'  # the web-form canary and its agent_reply phase
AGENT_REPLY_PHASE = "agent_reply"
DATABASE_SELECTOR = 'type="postgres"'
TICKET_BACKLOG_QUERY = "open_tickets"  # [[probes.queries]] names of deploy/config.production.toml
ESCALATION_RATIO_QUERY = "escalation_ratio_7d"
LLM_SELECTOR = 'type="llm"'
PROVIDER_STATUS_SELECTOR = 'type="statuspage"'
GMAIL_SELECTOR = 'type="gmail"'
WHATSAPP_SELECTOR = 'type="whatsapp"'
TWILIO_SELECTOR = 'type="twilio"'
REDIS_SELECTOR = 'type="redis"'
TLS_SELECTOR = 'type="tls"'
KAFKA_LAG_SELECTOR = 'type="kafka_lag"'
KAFKA_DLQ_SELECTOR = 'type="kafka_dlq"'

# Failures that another alert judges with its own threshold and severity, so "a critical probe failing" does not
# page for them (it opens a ticket): limits and expiries (the database, Kafka, Redis, TLS and Gmail alerts), rate
# limits (the canary's own calls being throttled), what a provider's status page says about itself, and a slow LLM
# (the web-form canary pages when the agent's replies really stop). Each entry is one selector's matchers.
JUDGED_FAILURES = (
    'reason=~"threshold|expiry|rate_limited"',
    'type="statuspage"',
    'type="llm", reason="slow"',
)
# How far back failure reasons are read: recent ones (longer than most probe intervals, the reasons an alert names)
# and judged ones (longer than the longest probe interval, e.g. the hourly tls probe).
REASON_WINDOW = "15m"
JUDGED_WINDOW = "2h"

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

# Alertmanager example (deploy/alertmanager/alertmanager.yml): a receiver per severity, notifications grouped by these.
ALERTMANAGER_RECEIVERS = {"page": "pager", "ticket": "ticket"}
ALERTMANAGER_GROUP_BY = ("environment", "channel")

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
    # Age of a group's oldest unconsumed message (kafka_lag's lag_seconds). Over the agent reply SLA (15 s) every
    # customer behind it has already missed it: a ticket after 5 minutes. Four times the SLA for 2 minutes pages
    # where Kafka is critical (the consumers have then been stuck for 3 minutes or more).
    "kafka_lag_warning_seconds": 15.0,
    "kafka_lag_critical_seconds": 60.0,
    "gmail_watch_min_remaining_seconds": 24 * 3600,
    "tls_expiry_warning_days": 14,
    "tls_expiry_critical_days": 3,
    "stale_intervals": 3,
    # canary_saturation_ratio above which a canary is saturated: ~0.1 is a loop steadily 10 ms behind its timers
    # (every run starts that late); a healthy one stays near 0 (canary/saturation.py).
    "saturation_ratio": 0.1,
    "db_long_queries": 0,  # queries over db_long_query_seconds (the postgres probe's long_query_threshold)
    "db_ungranted_locks": 0,
    "kafka_dlq_growth": 0,
    "statuspage_outage_indicator": 2,  # 0 none, 1 minor, 2 major, 3 critical
    "redis_memory_ratio": 0.9,
    # Synthetic objects (tickets) the canary created and could not remove: any left this long is a ticket to file.
    "orphaned_objects": 0,
}
ORPHANED_OBJECTS_FOR = "15m"

# Recording rule names: the rules define them, the dashboards and alerts read them. Labels: GROUPING.
ERROR_RATIO = "channel:canary_probe_errors:ratio_rate{window}"  # failed / all runs of critical probes
BURN_RATE = "channel:canary_error_budget:burn_rate{window}"  # ERROR_RATIO / (1 - SLO_OBJECTIVE)
BUDGET_REMAINING = "channel:canary_error_budget:remaining_ratio"  # 1 - ERROR_RATIO over SLO_PERIOD / (1 - objective)
SLO_OBJECTIVE_SERIES = "canary:slo_objective:ratio"  # the objective itself, for dashboards
