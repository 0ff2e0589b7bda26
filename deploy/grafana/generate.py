"""Generates the Grafana dashboards of deploy/grafana/ from deploy/mixin/config.py with grafana-foundation-sdk.

    python -m deploy.grafana.generate          # rewrite the committed JSON
    python -m deploy.grafana.generate --check  # exit 1 if the committed JSON is not what this generates

Every query reads either a canary series through config.SELECTOR or a recording rule named in config.py, and every
threshold line comes from config.THRESHOLDS or the SLO, so a threshold changes in config.py alone and the
dashboards never query a series the rules do not know. The output is deterministic (sorted keys, fixed ids and
uids): tests/test_dashboards.py regenerates it and compares byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as promql

from deploy.mixin import config

HERE = Path(__file__).resolve().parent

# Template variables: the datasource, then one per GROUPING label, each narrowing the next.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
VARIABLE_LABELS = config.GROUPING  # environment, location, channel
PROBE_VARIABLE_LABELS = (*config.GROUPING, "probe")  # the probe-detail dashboard's
ALL_VALUE = ".*"  # "All" matches series without the label too (a deployment without `location`)

GREEN, YELLOW, ORANGE, RED, BLUE = "green", "yellow", "orange", "red", "blue"
DAY = 24 * 3600


# ---- query text ---------------------------------------------------------------------------------------------------

def _matchers(labels: Iterable[str]) -> list[str]:
    return [f'{label}=~"${label}"' for label in labels]


def sel(*extra: str, labels: Iterable[str] = VARIABLE_LABELS) -> str:
    """The matchers of a raw canary series: config.SELECTOR, the template variables, then `extra`."""
    return "{" + ", ".join([config.SELECTOR, *_matchers(labels), *extra]) + "}"


def rule_sel(*extra: str) -> str:
    """The matchers of a recording rule's series: they carry the GROUPING labels, not the scrape's job."""
    return "{" + ", ".join([*_matchers(VARIABLE_LABELS), *extra]) + "}"


def eq(label: str, value: str) -> str:
    return f'{label}="{value}"'


CRITICAL = 'importance!="warning"'  # only warning probes carry importance; critical ones have no such label
WARNING = 'importance="warning"'


def error_ratio(window: str) -> str:
    assert window in config.ERROR_RATIO_WINDOWS, window
    return config.ERROR_RATIO.format(window=window)


def burn_rate(window: str) -> str:
    assert window in config.ERROR_RATIO_WINDOWS, window
    return config.BURN_RATE.format(window=window)


def query(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False,
          as_table: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    return q.format(promql.PromQueryFormat.TABLE if as_table else promql.PromQueryFormat.TIME_SERIES)


# ---- field config helpers -----------------------------------------------------------------------------------------

def steps(*pairs: tuple[float | None, str]) -> dash.ThresholdsConfig:
    """Absolute thresholds: (None, base colour), then (value, colour from value on)."""
    return dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=value, color=color) for value, color in pairs]
    )


def value_map(*entries: tuple[int, str, str]) -> list[model.ValueMapping]:
    return [
        model.ValueMap(
            options={str(value): model.ValueMappingResult(text=text, color=color, index=index)
                     for index, (value, text, color) in enumerate(entries)}
        )
    ]


UP_DOWN = value_map((1, "UP", GREEN), (0, "DOWN", RED))
PASS_FAIL = value_map((1, "pass", GREEN), (0, "fail", RED))
PASS_WARN = value_map((1, "pass", GREEN), (0, "warn", ORANGE))
# canary_probe_kafka_consumer_group_status, Burrow's states (README, kafka_lag).
KAFKA_STATUS = value_map((0, "OK", GREEN), (1, "WARN", YELLOW), (2, "STALL", ORANGE), (3, "STOP", RED))


def legend_table() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def multi_tooltip() -> common_builders.VizTooltipOptions:
    return common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def graph(title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 12,
          height: int = 8, thresholds: dash.ThresholdsConfig | None = None,
          threshold_style: common.GraphThresholdsStyleMode = common.GraphThresholdsStyleMode.DASHED,
          bars: bool = False, minimum: float | None = 0, maximum: float | None = None) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
        .legend(legend_table())
        .tooltip(multi_tooltip())
        .show_points(common.VisibilityMode.NEVER)
        .fill_opacity(10)
        .line_width(1)
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    if thresholds is not None:
        panel = panel.thresholds(thresholds).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(threshold_style)
        )
    else:
        panel = panel.thresholds(steps((None, GREEN)))
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single_stat(title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 12,
                height: int = 5, thresholds: dash.ThresholdsConfig | None = None,
                mappings: list[model.ValueMapping] | None = None, no_value: str | None = None,
                decimals: float | None = None) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds or steps((None, GREEN)))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .justify_mode(common.BigValueJustifyMode.CENTER)
        .orientation(common.VizOrientation.AUTO)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mappings is not None:
        panel = panel.mappings(mappings)
    if no_value is not None:
        panel = panel.no_value(no_value)
    if decimals is not None:
        panel = panel.decimals(decimals)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def timeline(title: str, description: str, *targets: prometheus.Dataquery, mappings: list[model.ValueMapping],
             width: int = 24, height: int = 8) -> statetimeline.Panel:
    panel = (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .color_scheme(dash.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .thresholds(steps((None, GREEN)))
        .mappings(mappings)
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .row_height(0.9)
        .fill_opacity(80)
        .line_width(0)
        .legend(common_builders.VizLegendOptions().show_legend(False).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM))
        .tooltip(multi_tooltip())
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def override(**properties: object) -> list[model.DynamicConfigValue]:
    return [model.DynamicConfigValue(id_val=key, value=value) for key, value in properties.items()]


# ---- layout and the pieces both dashboards share ------------------------------------------------------------------

class Section:
    """A row of the dashboard and the panels under it. Rows stay expanded, and Grafana wants an expanded row's
    panels after the row, not inside it (panels inside a row are for collapsed rows)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.panels: list[object] = []

    def with_panel(self, panel: object) -> "Section":
        self.panels.append(panel)
        return self


def dashboard_link(title: str, uid: str) -> dash.DashboardLink:
    """A link in the dashboard's header that keeps the time range and the variables."""
    return (
        dash.DashboardLink(title)
        .type(model.DashboardLinkType.LINK)
        .url(f"/d/{uid}")
        .icon("dashboard")
        .include_vars(True)
        .keep_time(True)
    )


def new_board(title: str, uid: str, description: str, variable_labels: Iterable[str]) -> dash.Dashboard:
    """A dashboard with Grafana's built-in annotations, the datasource variable and one variable per label, each
    a label_values() of the canary series narrowed by the variables before it."""
    board = (
        dash.Dashboard(title)
        .uid(uid)
        .description(f"{description} Generated by deploy/grafana/generate.py from deploy/mixin/config.py; do not edit "
                     "by hand.")
        .tags(list(config.DASHBOARD_TAGS))
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .annotation(  # Grafana's own, as every dashboard created in its UI has it
            dash.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .built_in(1)
        )
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    previous: list[str] = []
    for label in variable_labels:
        metric = "canary_channel_up" if label == "channel" else "canary_probe_success"
        board = board.with_variable(
            dash.QueryVariable(label)
            .label(label.capitalize())
            .datasource(DATASOURCE)
            .query(f"label_values({metric}{sel(labels=previous)}, {label})")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(ALL_VALUE)
            .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )
        previous.append(label)
    return board


def add_sections(board: dash.Dashboard, *sections: Section) -> dash.Dashboard:
    for section in sections:
        board = board.with_row(dash.Row(section.title))
        for panel in section.panels:
            board = board.with_panel(panel)
    return board


def last_failure_table(selector: str, width: int = 12) -> table.Panel:
    return (
        table.Panel()
        .title("Last failure per probe")
        .description(
            "For each probe that failed in the time range: the reason of its latest failure (the "
            "canary_probe_failures_total{reason} counter that increased last) and when, to within the panel's "
            "resolution. Reasons are the closed set of the README's Metrics section."
        )
        .datasource(DATASOURCE)
        .span(width)
        .height(8)
        .with_target(
            # Per probe and reason, the last step of the range at which the failure counter was still
            # below its value at the end: the counter's last increase came right after it (within
            # $__interval). The latest of a probe's reasons is its last failure's. A counter reset (daemon
            # restart) leaves that right: older, higher values are not below the end value.
            query(
                "topk by (environment, location, channel, probe) (1, max_over_time((timestamp("
                f"canary_probe_failures_total{selector} < canary_probe_failures_total{selector} @ end()"
                ") * 1000)[$__range:$__interval]))",
                "", "A", instant=True, as_table=True,
            )
        )
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True,
                                      "type": True},
                    "indexByName": {"probe": 0, "channel": 1, "reason": 2, "Value": 3, "location": 4,
                                    "environment": 5},
                    "renameByName": {"Value": "last failure"},
                },
            )
        )
        .unit("dateTimeFromNow")
        .align(common.FieldTextAlignment.AUTO)
        .sort_by([common_builders.TableSortByFieldState().display_name("last failure").desc(True)])
        .no_value("no failures in the time range")
    )


# ---- the dashboards -----------------------------------------------------------------------------------------------

def build_channel_health() -> dash.Dashboard:
    t = config.THRESHOLDS
    slo_percent = f"{config.SLO_OBJECTIVE * 100:g}%"
    budget_ratio = 1 - config.SLO_OBJECTIVE
    long_windows = sorted({long for _, long, _, _, _ in config.BURN_RATE_ALERTS}, key=config.ERROR_RATIO_WINDOWS.index)

    channels = (
        Section("Channels")
        .with_panel(
            single_stat(
                "Channel state (canaries)",
                "canary_channel_up per channel: UP only when every probe of the channel passed its last run and no "
                "probe saw the platform report the channel down. With several locations selected, a channel is DOWN "
                "when any of them sees it down. Channels whose probes are all warnings (Kafka in fallback mode) "
                "show DOWN in orange.",
                "none",
                query(f"min by (channel) (canary_channel_up{sel(CRITICAL)})", "{{channel}}", "A", instant=True),
                query(f"min by (channel) (canary_channel_up{sel(WARNING)})", "{{channel}} (warning)", "B",
                      instant=True),
                mappings=UP_DOWN,
                thresholds=steps((None, RED), (1, GREEN)),
                no_value="no canary series: check the datasource and the variables",
            ).override_by_query("B", override(mappings=value_map((1, "UP", GREEN), (0, "DOWN", ORANGE))))
        )
        .with_panel(
            single_stat(
                "Platform's own report",
                "canary_platform_channel_up: what the platform itself reports per channel (its /health channel map, "
                "read by the api-health probe), apart from the canaries' results. Canary DOWN while the platform "
                "says ACTIVE: the platform has not noticed the outage.",
                "none",
                query(f"min by (channel) (canary_platform_channel_up{sel()})", "{{channel}}", "A", instant=True),
                mappings=value_map((1, "ACTIVE", GREEN), (0, "INACTIVE", RED)),
                thresholds=steps((None, RED), (1, GREEN)),
                no_value="no probe reads a channel map",
            )
        )
    )

    probes = (
        Section("Probes")
        .with_panel(
            timeline(
                "Probe results",
                "canary_probe_success per probe (and location): green pass, red fail; warning probes (Kafka) fail "
                "in orange. A gap is a probe that has not run or was not scraped.",
                query(f"min by (probe, location) (canary_probe_success{sel(CRITICAL)})", "{{probe}} {{location}}", "A"),
                query(f"min by (probe, location) (canary_probe_success{sel(WARNING)})",
                      "{{probe}} {{location}} (warning)", "B"),
                mappings=PASS_FAIL,
            ).override_by_query("B", override(mappings=PASS_WARN))
        )
        .with_panel(last_failure_table(sel()))
        .with_panel(
            graph(
                "Failed runs by reason",
                "increase(canary_probe_failures_total) per probe and reason: which probe fails, why, how often.",
                "short",
                query(f"sum by (probe, reason) (increase(canary_probe_failures_total{sel()}[$__rate_interval])) > 0",
                      "{{probe}}: {{reason}}"),
                bars=True,
            )
        )
        .with_panel(
            graph(
                "Intervals since the last run",
                "(time() − canary_probe_last_run_timestamp_seconds) / canary_probe_interval_seconds: how many of its "
                f"own intervals ago each probe last finished a run. Above {t['stale_intervals']:g} the probe is stale "
                "(stuck scheduler, probe hanging past its timeout, daemon not scraped).",
                "short",
                query(
                    f"max by (probe) ((time() - canary_probe_last_run_timestamp_seconds{sel()}) "
                    f"/ canary_probe_interval_seconds{sel()})",
                    "{{probe}}",
                ),
                thresholds=steps((None, GREEN), (t["stale_intervals"], RED)),
            )
        )
        .with_panel(
            graph(
                "Run duration",
                "canary_probe_duration_seconds: how long each probe's last run took.",
                "s",
                query(f"max by (probe) (canary_probe_duration_seconds{sel()})", "{{probe}}"),
            )
        )
    )

    latency = (
        Section("Latency")
        .with_panel(
            graph(
                "Phase durations",
                "canary_probe_phase_duration_seconds of the last run, per probe and phase (http: dns, connect, tls, "
                "first_byte, transfer; transaction: one per step; …).",
                "s",
                query(f"max by (probe, phase) (canary_probe_phase_duration_seconds{sel()})", "{{probe}} {{phase}}"),
            )
        )
        .with_panel(
            graph(
                "API latency p95",
                "95th percentile of the api channel's run durations (canary_probe_latency_seconds histogram) "
                f"against the runbook thresholds: warning {t['api_latency_p95_warning_seconds']:g} s, critical "
                f"{t['api_latency_p95_critical_seconds']:g} s.",
                "s",
                query(
                    "histogram_quantile(0.95, sum by (le, probe) (rate(canary_probe_latency_seconds_bucket"
                    f"{sel(eq('channel', 'api'))}[$__rate_interval])))",
                    "{{probe}} p95",
                ),
                thresholds=steps((None, GREEN), (t["api_latency_p95_warning_seconds"], ORANGE),
                                 (t["api_latency_p95_critical_seconds"], RED)),
            )
        )
        .with_panel(
            graph(
                f"Web form: agent reply time vs the {t['agent_reply_sla_seconds']:g} s SLA",
                "The web-form transaction's agent_reply phase: from the ticket's submission until the AI agent's "
                f"reply showed (polled). The line is the tier-1 promise of {t['agent_reply_sla_seconds']:g} s; a "
                "reply that never comes within the probe's poll limit fails as `slow`.",
                "s",
                query(
                    "max by (probe, location) (canary_probe_phase_duration_seconds"
                    f"{sel(eq('type', 'transaction'), eq('phase', 'agent_reply'))})",
                    "{{probe}} {{location}}",
                ),
                thresholds=steps((None, GREEN), (t["agent_reply_sla_seconds"], RED)),
            )
        )
        .with_panel(
            graph(
                "Web form: transaction phases",
                "The web-form transaction's steps of the last run: submit (time to ticket), agent_reply, "
                "delete_ticket (the cleanup).",
                "s",
                query(
                    "max by (probe, phase) (canary_probe_phase_duration_seconds"
                    f"{sel(eq('type', 'transaction'))})",
                    "{{probe}} {{phase}}",
                ),
            )
        )
    )

    email_ai = (
        Section("Email and AI agent")
        .with_panel(
            single_stat(
                "Gmail watch expires in",
                "canary_probe_gmail_watch_expiry_timestamp_seconds − time(): Gmail drops its Pub/Sub watch silently "
                "after 7 days unless renewed; the gmail probe renews it through the platform. Red: less than "
                f"{t['gmail_watch_min_remaining_seconds'] / 3600:g} h left, so renewals are failing.",
                "dtdurations",
                query(f"min by (probe) (canary_probe_gmail_watch_expiry_timestamp_seconds{sel()}) - time()",
                      "{{probe}}", instant=True),
                width=6,
                height=8,
                thresholds=steps((None, RED), (t["gmail_watch_min_remaining_seconds"], GREEN)),
                no_value="no gmail probe",
            )
        )
        .with_panel(
            graph(
                "LLM rate-limit headroom",
                "canary_probe_llm_ratelimit_headroom_ratio: remaining / limit of the provider's requests and tokens "
                f"(x-ratelimit-* headers). Below {t['llm_min_headroom_ratio']:g} the llm probe fails "
                "`rate_limited`.",
                "percentunit",
                query(f"min by (probe, kind) (canary_probe_llm_ratelimit_headroom_ratio{sel()})",
                      "{{probe}} {{kind}}"),
                width=9,
                maximum=1,
                thresholds=steps((None, RED), (t["llm_min_headroom_ratio"], GREEN)),
            )
        )
        .with_panel(
            graph(
                "LLM completion time",
                "The llm probe's 1-token completion (phase completion) against the runbooks' "
                f"{t['llm_slow_seconds']:g} s: slower answers fail as `slow`.",
                "s",
                query(
                    "max by (probe) (canary_probe_phase_duration_seconds"
                    f"{sel(eq('type', 'llm'), eq('phase', 'completion'))})",
                    "{{probe}}",
                ),
                width=9,
                thresholds=steps((None, GREEN), (t["llm_slow_seconds"], RED)),
            )
        )
    )

    kafka = (
        Section("Kafka")
        .with_panel(
            graph(
                "Consumer group lag",
                "canary_probe_kafka_consumer_group_lag: messages the group has not committed yet, summed over its "
                f"partitions, read without joining the group. Above {t['kafka_consumer_lag']:g} the kafka_lag probe "
                "fails `threshold`.",
                "short",
                query(f"max by (group) (canary_probe_kafka_consumer_group_lag{sel()})", "{{group}}"),
                width=6,
                thresholds=steps((None, GREEN), (t["kafka_consumer_lag"], RED)),
            )
        )
        .with_panel(
            graph(
                "Oldest waiting message",
                "canary_probe_kafka_consumer_group_lag_seconds: how long the group's oldest unconsumed message has "
                "waited, read from its own timestamp (one fetch at the committed offset). Customers behind it have "
                f"waited at least as long: above {t['kafka_lag_warning_seconds']:g} s (the agent reply SLA) "
                "CanaryKafkaMessagesWaiting opens a ticket.",
                "s",
                query(f"max by (group) (canary_probe_kafka_consumer_group_lag_seconds{sel()})", "{{group}}"),
                width=6,
                thresholds=steps((None, GREEN), (t["kafka_lag_warning_seconds"], ORANGE), (t["kafka_lag_critical_seconds"], RED)),
            )
        )
        .with_panel(
            timeline(
                "Consumer group status",
                "canary_probe_kafka_consumer_group_status, Burrow's rules over the last runs: OK, WARN (lag grows "
                "while commits move), STALL (commits stopped), STOP (lag and no progress for stop_after). STALL and "
                "STOP fail the probe.",
                query(f"max by (group) (canary_probe_kafka_consumer_group_status{sel()})", "{{group}}"),
                mappings=KAFKA_STATUS,
                width=6,
            )
        )
        .with_panel(
            graph(
                "Dead-letter queue growth",
                "canary_probe_kafka_dlq_growth: new messages in each dead-letter topic since the probe's previous "
                "run (a poison pill). Any growth fails the kafka_dlq probe with its default max_growth of 0.",
                "short",
                query(f"max by (topic) (canary_probe_kafka_dlq_growth{sel()})", "{{topic}}"),
                width=6,
                bars=True,
                thresholds=steps((None, GREEN), (1, RED)),
            )
        )
    )

    tls = Section("Certificates").with_panel(
        single_stat(
            "TLS certificate expires in",
            "canary_probe_tls_certificate_expiry_timestamp_seconds − time(), the earliest expiry in each tls probe's "
            f"served chain: orange under {t['tls_expiry_warning_days']:g} days, red under "
            f"{t['tls_expiry_critical_days']:g} days (the runbooks' cert-manager checks).",
            "dtdurations",
            query(f"min by (probe) (canary_probe_tls_certificate_expiry_timestamp_seconds{sel()}) - time()",
                  "{{probe}}", instant=True),
            width=24,
            height=4,
            thresholds=steps((None, RED), (t["tls_expiry_critical_days"] * DAY, ORANGE),
                             (t["tls_expiry_warning_days"] * DAY, GREEN)),
            no_value="no tls probe configured",
        )
    )

    # A line at each alert's burn factor: yellow for tickets, orange for pages, red for the fastest page.
    factors = sorted({(factor, severity) for severity, _, _, factor, _ in config.BURN_RATE_ALERTS})
    burn_thresholds = [(None, GREEN)] + [
        (factor, RED if factor == factors[-1][0] else YELLOW if severity == "ticket" else ORANGE)
        for factor, severity in factors
    ]
    slo = (
        Section(f"Error budget (SLO {slo_percent} of critical canary runs over {config.SLO_PERIOD})")
        .with_panel(
            single_stat(
                f"Error budget remaining ({config.SLO_PERIOD})",
                f"{config.BUDGET_REMAINING}: the share of the {config.SLO_PERIOD} error budget "
                f"(1 − {config.SLO_OBJECTIVE:g} of critical canary runs may fail) still left per channel; below 0 "
                "the SLO is broken. The worst location is shown when several are selected.",
                "percentunit",
                query(f"min by (channel) ({config.BUDGET_REMAINING}{rule_sel()})", "{{channel}}", instant=True),
                width=12,
                height=6,
                thresholds=steps((None, RED), (0, ORANGE), (0.5, GREEN)),
                decimals=1,
                no_value="no SLO recording rules loaded",
            )
        )
        .with_panel(
            single_stat(
                f"Availability ({config.SLO_PERIOD}) vs objective",
                f"1 − {error_ratio(config.SLO_PERIOD)}: the share of critical canary runs that passed over "
                f"{config.SLO_PERIOD}, green at or above the objective ({config.SLO_OBJECTIVE_SERIES}).",
                "percentunit",
                query(f"1 - max by (channel) ({error_ratio(config.SLO_PERIOD)}{rule_sel()})", "{{channel}}", "A",
                      instant=True),
                query(f"min({config.SLO_OBJECTIVE_SERIES}{rule_sel()})", "objective", "B", instant=True),
                width=12,
                height=6,
                thresholds=steps((None, RED), (config.SLO_OBJECTIVE, GREEN)),
                decimals=2,
                no_value="no SLO recording rules loaded",
            ).override_by_query("B", override(**{"color": {"mode": "fixed", "fixedColor": BLUE}}))
        )
        .with_panel(
            graph(
                "Burn rate",
                "How fast each channel spends its error budget (1 = exactly the budget over "
                f"{config.SLO_PERIOD}), over the alerts' long windows. The lines are the multiwindow alerts' burn "
                "factors: "
                + ", ".join(f"{factor:g} over {long} and {short} ({severity})"
                            for severity, long, short, factor, _ in config.BURN_RATE_ALERTS)
                + ".",
                "short",
                *[
                    query(f"max by (channel) ({burn_rate(window)}{rule_sel()})", f"{{{{channel}}}} {window}",
                          chr(ord("A") + index))
                    for index, window in enumerate(long_windows)
                ],
                thresholds=steps(*burn_thresholds),
            )
        )
        .with_panel(
            graph(
                "Error ratio",
                f"{config.ERROR_RATIO.format(window='<window>')}: failed / all critical canary runs per channel over "
                f"the short windows, against the budget line 1 − {config.SLO_OBJECTIVE_SERIES}.",
                "percentunit",
                *[
                    query(f"max by (channel) ({error_ratio(window)}{rule_sel()})", f"{{{{channel}}}} {window}",
                          chr(ord("A") + index))
                    for index, window in enumerate(("5m", "1h"))
                ],
                query(f"1 - min({config.SLO_OBJECTIVE_SERIES}{rule_sel()})", "error budget (1 − objective)", "C"),
                thresholds=steps((None, GREEN), (budget_ratio, RED)),
            ).override_by_query("C", override(**{"color": {"mode": "fixed", "fixedColor": RED},
                                                  "custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}))
        )
    )

    board = new_board(
        config.CHANNEL_HEALTH_DASHBOARD_TITLE,
        config.CHANNEL_HEALTH_DASHBOARD_UID,
        "channel-canary's synthetic probes per channel of the support platform: state, failures and their reasons, "
        "latencies against the runbook thresholds, Gmail watch, LLM quota, Kafka, error budget.",
        VARIABLE_LABELS,
    ).link(dashboard_link("Probe detail", config.PROBE_DETAIL_DASHBOARD_UID))
    return add_sections(board, channels, probes, latency, email_ai, kafka, tls, slo)


def number_panels(board: model.Dashboard) -> model.Dashboard:
    """Fixed panel ids in layout order, so the output is stable and links to a panel keep working."""
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    return board


def build_probe_detail() -> dash.Dashboard:
    t = config.THRESHOLDS

    def psel(*extra: str) -> str:
        return sel(*extra, labels=PROBE_VARIABLE_LABELS)

    result = (
        Section("Result")
        .with_panel(
            single_stat(
                "Last result",
                "canary_probe_success: whether each selected probe's last run passed.",
                "none",
                query(f"min by (probe) (canary_probe_success{psel()})", "{{probe}}", instant=True),
                width=8,
                mappings=PASS_FAIL,
                thresholds=steps((None, RED), (1, GREEN)),
                no_value="no such probe",
            )
        )
        .with_panel(
            single_stat(
                "Passed runs in the time range",
                "increase(canary_probe_runs_total{result=\"success\"}) / increase(canary_probe_runs_total) over "
                f"the dashboard's time range; green at or above the SLO objective ({config.SLO_OBJECTIVE:g}).",
                "percentunit",
                query(
                    f"sum by (probe) (increase(canary_probe_runs_total{psel(eq('result', 'success'))}[$__range])) "
                    f"/ sum by (probe) (increase(canary_probe_runs_total{psel()}[$__range]))",
                    "{{probe}}", instant=True,
                ),
                width=8,
                decimals=2,
                thresholds=steps((None, RED), (config.SLO_OBJECTIVE, GREEN)),
            )
        )
        .with_panel(
            single_stat(
                "Last success",
                "canary_probe_last_success_timestamp_seconds: when each probe last passed (none since the daemon "
                "was started or the probe configured: no value).",
                "dateTimeFromNow",
                query(f"max by (probe) (canary_probe_last_success_timestamp_seconds{psel()} > 0) * 1000",
                      "{{probe}}", instant=True),
                width=8,
                thresholds=steps((None, BLUE)),
                no_value="never",
            )
        )
        .with_panel(
            timeline(
                "Result over time",
                "canary_probe_success per probe and location.",
                query(f"min by (probe, location) (canary_probe_success{psel()})", "{{probe}} {{location}}"),
                mappings=PASS_FAIL,
                height=6,
            )
        )
    )
    failures = (
        Section("Failures")
        .with_panel(last_failure_table(psel()))
        .with_panel(
            graph(
                "Failed runs by reason",
                "increase(canary_probe_failures_total) per probe and reason.",
                "short",
                query(f"sum by (probe, reason) (increase(canary_probe_failures_total{psel()}[$__rate_interval])) > 0",
                      "{{probe}}: {{reason}}"),
                bars=True,
            )
        )
    )
    buckets = f"sum by (le, probe) (rate(canary_probe_latency_seconds_bucket{psel()}[$__rate_interval]))"
    timing = (
        Section("Timing")
        .with_panel(
            graph(
                "Run duration quantiles",
                "p50, p90 and p99 of the run durations (canary_probe_latency_seconds histogram, its buckets from "
                "[daemon].latency_buckets).",
                "s",
                *[
                    query(f"histogram_quantile({q}, {buckets})", f"{{{{probe}}}} p{round(q * 100)}", ref)
                    for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
                ],
            )
        )
        .with_panel(
            graph(
                "Phases of the last run",
                "canary_probe_phase_duration_seconds per probe and phase.",
                "s",
                query(f"max by (probe, phase) (canary_probe_phase_duration_seconds{psel()})", "{{probe}} {{phase}}"),
            )
        )
        .with_panel(
            graph(
                "Time since the last run",
                "time() − canary_probe_last_run_timestamp_seconds, beside the age at which the probe counts as stale "
                f"({t['stale_intervals']:g} × canary_probe_interval_seconds).",
                "s",
                query(f"max by (probe) (time() - canary_probe_last_run_timestamp_seconds{psel()})", "{{probe}}", "A"),
                query(f"max by (probe) (canary_probe_interval_seconds{psel()}) * {t['stale_intervals']:g}",
                      "{{probe}} stale after", "B"),
                width=24,
            ).override_by_query("B", override(**{"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}))
        )
    )
    board = new_board(
        config.PROBE_DETAIL_DASHBOARD_TITLE,
        config.PROBE_DETAIL_DASHBOARD_UID,
        "One or a few canary probes in detail: results, failure reasons, run durations and phases.",
        PROBE_VARIABLE_LABELS,
    ).link(dashboard_link("Channel health", config.CHANNEL_HEALTH_DASHBOARD_UID))
    return add_sections(board, result, failures, timing)


DASHBOARDS = {"channel-health.json": build_channel_health, "probe-detail.json": build_probe_detail}


def render(name: str) -> str:
    board = number_panels(DASHBOARDS[name]().build())
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(board) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = HERE / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m deploy.grafana.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
