"""The status page in a real headless Chromium, against the daemon and the sandbox as subprocesses.

Healthy first, then with faults on — the WhatsApp webhook rejecting every request (a critical probe) and the Kafka
broker killed (a warning-only probe) — without reloading the page: its script must bring the failures in. Every
assertion is on the rendered DOM (after the script ran) or on computed styles, at 1280 px and at a true 390 px
viewport, in light and dark mode; the screenshots land in $CANARY_SCREENSHOT_DIR (docs/screenshots/ for
the README) or a temporary directory.

The uptime history is seeded: a week of fabricated runs (a two-hour WhatsApp outage three days ago, a six-hour Kafka
one two days ago) is written to the state directory before the daemon starts, so the page's 7 d figures prove the
daemon loaded it.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import re
import random
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from canary.uptime import FILE_NAME, UptimeBook
from tests.browser import Browser, chromium_binary
from tests.conftest import Process, ROOT, free_port, probe_command, wait_for_port, write_config
from tests.kafka_broker import Broker, create_topics

CHROMIUM = chromium_binary()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install Debian's 'chromium' package (scripts/test.sh does, as root)"
)
# The README's screenshots come from this test: `CANARY_SCREENSHOT_DIR=docs/screenshots ./scripts/test.sh -k browser`.
# Otherwise they go to a temporary directory, so a test run leaves the work tree as it was.
SCREENSHOTS = Path(os.environ.get("CANARY_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="canary-screenshots-"))
ACCOUNT_SID = "AC" + "0" * 32  # the sandbox's account
CREDENTIALS = ROOT / "deploy" / "sandbox" / "gmail-authorized-user.json"
RUNBOOK = "https://runbooks.example.com/channel-canary#whatsapp-webhook"
PHONE = 390

# name: (typical duration in seconds, hours-ago ranges in which the seeded runs failed)
SEEDED = {
    "api-health": (0.012, []),
    "web-form": (0.62, [(30, 30.25)]),
    "whatsapp-inbound": (0.035, [(72, 74)]),
    "twilio-account": (0.07, []),
    "gmail": (0.11, []),
    "llm": (0.28, [(5, 5.1)]),
    "llm-provider-status": (0.02, []),
    "kafka": (0.05, [(48, 54)]),
}


def page_config(tmp_path: Path, platform: str, kafka: str) -> Path:
    return write_config(tmp_path, f"""
        [daemon]
        interval = "2s"
        timeout = "1500ms"
        jitter = "300ms"
        shutdown_grace = "2s"

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        description = "FastAPI GET /health answers healthy with the database active"
        url = "{platform}/health"
        expect_json = {{ "status" = "healthy", "database" = "active" }}
        channel_map = "channels"

        [[probes]]
        name = "web-form"
        type = "transaction"
        channel = "web_form"
        description = "A synthetic ticket submitted through the web form gets an agent reply in time"
        base_url = "{platform}"
        interval = "3s"
        timeout = "2500ms"
        [[probes.steps]]
        name = "submit"
        method = "POST"
        url = "/support/submit"
        expect_status = [200, 201]
        extract = {{ ticket_id = "ticket_id" }}
        json = {{ name = "Channel Canary", email = "canary@example.com", subject = "[canary] {{run_id}}", message = "Synthetic canary message." }}
        [[probes.steps]]
        name = "agent_reply"
        url = "/support/ticket/{{ticket_id}}"
        expect = ['messages[*].role contains "agent"']
        poll = {{ every = "200ms", within = "2s" }}
        [[probes.cleanup]]
        name = "delete_ticket"
        method = "DELETE"
        url = "/support/ticket/{{ticket_id}}"
        expect_status = ["2xx", 404]

        [[probes]]
        name = "whatsapp-inbound"
        type = "whatsapp"
        channel = "whatsapp"
        description = "A signed inbound WhatsApp message gets TwiML back; forged or missing signatures are refused"
        runbook_url = "{RUNBOOK}"
        url = "{platform}/whatsapp/webhook"
        auth_token = "sandbox-twilio-auth-token"
        account_sid = "{ACCOUNT_SID}"
        from_number = "+15005550006"
        to_number = "+14155238886"

        [[probes]]
        name = "twilio-account"
        type = "twilio"
        channel = "whatsapp"
        description = "Twilio accepts the account SID and auth token, and the account is active"
        account_sid = "{ACCOUNT_SID}"
        auth_token = "sandbox-twilio-auth-token"
        api_url = "{platform}/twilio"

        [[probes]]
        name = "gmail"
        type = "gmail"
        channel = "email"
        description = "Gmail refresh token works, users.getProfile answers, the push watch is renewed in time"
        credentials_file = "{CREDENTIALS}"
        oauth_token_url = "{platform}/google/token"
        gmail_api_url = "{platform}/google"
        renew_url = "{platform}/gmail/setup-watch"

        [[probes]]
        name = "llm"
        type = "llm"
        channel = "ai_agent"
        description = "The LLM provider lists the agent's model and answers a 1-token prompt in time"
        base_url = "{platform}/llm/openai/v1"
        api_key = "sandbox-llm-api-key"
        model = "meta-llama/llama-4-scout-17b-16e-instruct"
        slow_after = "1s"

        [[probes]]
        name = "llm-provider-status"
        type = "statuspage"
        channel = "ai_provider"
        description = "The LLM provider's own status page reports no major outage"
        url = "{platform}/statuspage"
        fail_at = "major"

        [[probes]]
        name = "kafka"
        type = "kafka"
        channel = "kafka"
        severity = "warning"
        description = "Brokers answer, topics exist, a canary message goes round trip"
        bootstrap_servers = "{kafka}"
        topics = ["fte.tickets.incoming"]
        canary_topic = "fte.canary"
    """)


def seed_history(state_dir: Path, now: float) -> None:
    """A week of runs every 5 minutes, written through the uptime book itself, as a daemon would have saved it."""
    book = UptimeBook(state_dir / FILE_NAME)
    jitter = random.Random(7)
    for name, (duration, outages) in SEEDED.items():
        for step in range(7 * 24 * 12, 1, -1):
            hours_ago = step / 12
            failed = any(start <= hours_ago < end for start, end in outages)
            book.add(name, now - step * 300, not failed, duration * (0.8 + 0.4 * jitter.random()))
    assert book.save()


@pytest.fixture
async def daemon(tmp_path: Path, sandbox_process: str, own_kafka_broker: Broker) -> AsyncIterator[dict[str, Any]]:
    await create_topics(own_kafka_broker.bootstrap, "fte.tickets.incoming", "fte.canary")
    state_dir = tmp_path / "state"
    seed_history(state_dir, time.time())
    port = free_port()
    config = page_config(tmp_path, sandbox_process, own_kafka_broker.bootstrap)
    process = Process(probe_command("run", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                    "--state.dir", str(state_dir)), cwd=ROOT)
    try:
        wait_for_port(port, process)
        yield {"base": f"http://127.0.0.1:{port}", "platform": sandbox_process, "broker": own_kafka_broker,
               "process": process}
    finally:
        process.stop()


async def status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/status.json") as response:
        assert response.status == 200
        return await response.json()


async def wait_for_states(
    session: aiohttp.ClientSession, base: str, wanted: dict[str, str], runs: int = 1, timeout: float = 40.0
) -> None:
    """Until /status.json shows every named probe in the wanted state, and every probe with `runs` runs."""
    deadline = time.monotonic() + timeout
    seen: dict[str, tuple[str, int]] = {}
    while time.monotonic() < deadline:
        probes = (await status(session, base))["probes"]
        seen = {p["name"]: (p["state"], len(p["history"])) for p in probes}
        if all(seen.get(name, ("", 0))[0] == state for name, state in wanted.items()) and min(n for _, n in seen.values()) >= runs:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"probes not in {wanted} with {runs} runs within {timeout}s: {seen}")


# What the tests read from the rendered page, in one script run.
PAGE_FACTS = """(() => {
  const text = (el) => el ? el.textContent.replace(/\\s+/g, ' ').trim() : null;
  const rows = Array.from(document.querySelectorAll('tr.probe'));
  const style = (el, prop) => el ? getComputedStyle(el)[prop] : null;
  return {
    verdict: text(document.getElementById('verdict')),
    status: document.getElementById('live').dataset.status,
    refreshes: document.documentElement.getAttribute('data-refreshes'),
    rows: rows.map((row) => ({
      name: row.dataset.probe,
      classes: row.className,
      badge: text(row.querySelector('.badge')),
      badgeClass: row.querySelector('.badge').className,
      age: text(row.querySelector('td.when time')),
      datetime: row.querySelector('td.when time') && row.querySelector('td.when time').getAttribute('datetime'),
      title: row.querySelector('td.when time') && row.querySelector('td.when time').getAttribute('title'),
      description: text(row.querySelector('.desc')),
      target: text(row.querySelector('.target')),
      runbook: row.querySelector('a.runbook') && row.querySelector('a.runbook').href,
      uptime: Array.from(row.querySelectorAll('td.uptime .up-figure')).map(text),
      sparkline: row.querySelectorAll('svg.spark polyline').length,
      failDots: row.querySelectorAll('svg.spark circle.fail').length,
      lastSuccess: text(row.querySelector('td.when small')),
    })),
    channels: Array.from(document.querySelectorAll('li.channel')).map((c) => [c.dataset.channel, text(c.querySelector('.badge'))]),
    downBadge: {bg: style(document.querySelector('tr.probe .badge.down'), 'backgroundColor'),
                border: style(document.querySelector('tr.probe .badge.down'), 'borderTopStyle')},
    warnBadge: {bg: style(document.querySelector('tr.probe .badge.warn'), 'backgroundColor'),
                border: style(document.querySelector('tr.probe .badge.warn'), 'borderTopStyle')},
    body: {bg: style(document.body, 'backgroundColor'), fg: style(document.body, 'color')},
    darkScheme: matchMedia('(prefers-color-scheme: dark)').matches,
    innerWidth: innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    widest: Math.max(...Array.from(document.querySelectorAll('body *')).map((e) => e.getBoundingClientRect().right)),
    legend: text(document.querySelector('.legend')),
  };
})()"""

AGE = re.compile(r"^(just now|\d{1,2} s ago|\d{1,2} min ago)$")


def luminance(css_color: str) -> float:
    red, green, blue = (int(part) for part in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def check_common(facts: dict[str, Any], dom: str) -> None:
    """What every state and width must show."""
    rows = {row["name"]: row for row in facts["rows"]}
    assert set(rows) == set(SEEDED)
    for row in facts["rows"]:
        assert AGE.match(row["age"] or ""), row  # "13 s ago", never "13.3425s ago"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["datetime"]) and row["title"].endswith(" UTC"), row
        assert row["description"], row
        assert row["sparkline"] == 1, row
        assert [figure.split()[0] for figure in row["uptime"]] == ["1h", "24h", "7d"], row
    assert rows["whatsapp-inbound"]["runbook"] == RUNBOOK
    assert rows["api-health"]["runbook"] is None
    # The seeded week: a two-hour WhatsApp outage of 168 hours reads 98.8 % over 7 d, and nothing over 24 h.
    seven_days = float(rows["whatsapp-inbound"]["uptime"][2].split()[1].rstrip("%"))
    assert 98.0 < seven_days < 99.5, rows["whatsapp-inbound"]["uptime"]
    assert rows["kafka"]["uptime"][2] != "7d 100%"
    # No internal paths or account identifiers, anywhere in the rendered page.
    assert rows["gmail"]["target"] == f"gmail {rows['gmail']['target'].split()[1]}"
    assert "gmail-authorized-user.json" not in dom and str(ROOT) not in dom
    assert ACCOUNT_SID not in dom and "sandbox-twilio-auth-token" not in dom and "sandbox-llm-api-key" not in dom
    assert "DOWN" in facts["legend"] and "WARN" in facts["legend"]


def check_width(facts: dict[str, Any], width: int) -> None:
    assert facts["innerWidth"] == width, facts["innerWidth"]
    assert facts["scrollWidth"] <= width, f"horizontal overflow at {width} px: {facts['scrollWidth']}"
    assert facts["widest"] <= width + 0.5, f"an element ends at {facts['widest']} px, past {width} px"


async def test_the_status_page_in_chromium(daemon: dict[str, Any]) -> None:
    assert CHROMIUM is not None
    base, platform = daemon["base"], daemon["platform"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, Browser(CHROMIUM) as browser:
        # A few runs each, so the sparklines have a shape.
        await wait_for_states(session, base, {name: "up" for name in SEEDED}, runs=6)

        # --- healthy ------------------------------------------------------------------------------------------
        await browser.viewport(1280, 900)
        await browser.open(f"{base}/")
        facts = await browser.evaluate(PAGE_FACTS)
        assert (facts["verdict"], facts["status"]) == ("All operational", "ok")
        assert all(row["badge"] == "UP" and "up" in row["classes"].split() for row in facts["rows"])
        assert all(badge == "UP" for _, badge in facts["channels"])
        check_common(facts, await browser.dom())
        check_width(facts, 1280)
        assert luminance(facts["body"]["bg"]) > 0.8 and not facts["darkScheme"]
        await browser.screenshot(SCREENSHOTS / "status-healthy-1280.png")

        await browser.viewport(PHONE, 844, mobile=True)
        await browser.open(f"{base}/")
        facts = await browser.evaluate(PAGE_FACTS)
        check_common(facts, await browser.dom())
        check_width(facts, PHONE)
        await browser.screenshot(SCREENSHOTS / "status-healthy-390.png")

        # --- faults on, the page left open: its script must bring them in without a reload ------------------
        await browser.viewport(1280, 900)
        await browser.open(f"{base}/")
        await browser.evaluate("window.openedOnce = true")
        async with session.post(f"{platform}/_sandbox/faults", json={"whatsapp_webhook": "reject_all"}) as response:
            assert response.status == 200
        daemon["broker"].kill()
        await wait_for_states(session, base, {"whatsapp-inbound": "down", "kafka": "down", "twilio-account": "up"})
        await browser.wait_for("document.getElementById('live').dataset.status === 'critical' "
                               "&& document.querySelectorAll('tr.probe.warn').length === 1", timeout=30)
        assert await browser.evaluate("window.openedOnce === true")  # swapped in place, not reloaded
        facts = await browser.evaluate(PAGE_FACTS)
        assert int(facts["refreshes"]) >= 1
        assert facts["verdict"] == "1 critical failing · 1 warning"
        order = [(row["name"], row["badge"]) for row in facts["rows"]]
        assert order[:2] == [("whatsapp-inbound", "DOWN"), ("kafka", "WARN")], order
        assert all(badge == "UP" for _, badge in order[2:]), order
        rows = {row["name"]: row for row in facts["rows"]}
        assert "down" in rows["whatsapp-inbound"]["classes"].split() and "badge down" == rows["whatsapp-inbound"]["badgeClass"]
        assert "warn" in rows["kafka"]["classes"].split() and "badge warn" == rows["kafka"]["badgeClass"]
        # WARN looks unlike DOWN: another colour, and an outline (dashed) where DOWN is solid.
        assert facts["downBadge"]["bg"] != facts["warnBadge"]["bg"]
        assert (facts["downBadge"]["border"], facts["warnBadge"]["border"]) == ("solid", "dashed")
        assert rows["whatsapp-inbound"]["failDots"] >= 1 and rows["whatsapp-inbound"]["lastSuccess"].startswith("last success")
        channels = dict(facts["channels"])
        assert channels["whatsapp"] == "DOWN" and channels["kafka"] == "WARN" and channels["email"] == "UP"
        assert [name for name, _ in facts["channels"]][:2] == ["whatsapp", "kafka"]
        check_common(facts, await browser.dom())
        check_width(facts, 1280)
        await browser.screenshot(SCREENSHOTS / "status-fault-1280.png")

        await browser.viewport(PHONE, 844, mobile=True)
        facts = await browser.evaluate(PAGE_FACTS)
        check_width(facts, PHONE)
        assert [row["name"] for row in facts["rows"]][:2] == ["whatsapp-inbound", "kafka"]
        await browser.screenshot(SCREENSHOTS / "status-fault-390.png")

        # --- dark mode, following the system setting ----------------------------------------------------------
        await browser.viewport(PHONE, 844, mobile=True, dark=True)
        facts = await browser.evaluate(PAGE_FACTS)
        assert facts["darkScheme"]
        assert luminance(facts["body"]["bg"]) < 0.15 and luminance(facts["body"]["fg"]) > 0.75, facts["body"]
        check_width(facts, PHONE)
        await browser.screenshot(SCREENSHOTS / "status-fault-390-dark.png")
        await browser.viewport(1280, 900, dark=True)
        await browser.screenshot(SCREENSHOTS / "status-fault-1280-dark.png")

        # --- without JavaScript the page is the same, server-rendered -----------------------------------------
        await browser.viewport(1280, 900)
        await browser.scripts(enabled=False)
        await browser.open(f"{base}/")
        facts = await browser.evaluate(PAGE_FACTS)  # the protocol still evaluates; the page's own script did not run
        assert facts["refreshes"] is None
        assert facts["verdict"] == "1 critical failing · 1 warning"
        assert [row["name"] for row in facts["rows"]][:2] == ["whatsapp-inbound", "kafka"]
        await browser.scripts(enabled=True)

    status_now = json.dumps(await _final_status(base))
    assert ACCOUNT_SID not in status_now and "gmail-authorized-user.json" not in status_now


async def _final_status(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        document = await status(session, base)
    probes = {p["name"]: p for p in document["probes"]}
    assert document["overall"]["status"] == "critical"
    assert probes["kafka"]["severity"] == "warning" and probes["whatsapp-inbound"]["runbook_url"] == RUNBOOK
    assert probes["whatsapp-inbound"]["uptime"]["7d"]["runs"] > 2000  # the seeded week, loaded
    return document
