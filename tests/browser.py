"""A real headless Chromium for tests, driven over the DevTools protocol with aiohttp's websocket client.

Why the protocol and not `chromium --headless=new --screenshot --window-size=390,…`: the new headless mode keeps a
window at least 500 px wide, so a 390 px `--window-size` lays the page out at 500 px and crops the screenshot to
390 — a phone's layout is never seen. `Emulation.setDeviceMetricsOverride` gives the page a true 390 px viewport,
and `Emulation.setEmulatedMedia` switches `prefers-color-scheme` without restarting the browser.

The browser is a subprocess this module started, on a loopback-only debugging port, with its own throwaway
profile; it is ended by its pid. Every command has a time limit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Process

COMMAND_TIMEOUT = 20.0


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page; `async with Browser() as page:` gives the page."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._profile = tempfile.mkdtemp(prefix="canary-chromium-")
        self.process: Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self.width = 0

    async def __aenter__(self) -> "Browser":
        args = [
            self.binary, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
            "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}", "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox on
        self.process = Process(args, env={"DBUS_SESSION_BUS_ADDRESS": "disabled:"})
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        assert self.process is not None
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30.0
        while True:
            if port_file.exists() and len(port_file.read_text().split()) >= 2:
                break
            if self.process.popen.poll() is not None:
                raise AssertionError(f"chromium exited early:\n{self.process.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium did not open its debugging port within 30 s:\n{self.process.output()[-3000:]}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=COMMAND_TIMEOUT))
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        [page] = [target for target in targets if target["type"] == "page"][:1]
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._session is not None:
            await self._session.close()
        if self.process is not None:
            self.process.stop(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command and its answer; events that arrive meanwhile are dropped."""
        assert self._socket is not None
        self._next_id += 1
        ident = self._next_id
        await self._socket.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:
                message = await self._socket.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"the DevTools connection ended during {method}: {message.type}")
                answer = json.loads(message.data)
                if answer.get("id") == ident:
                    if "error" in answer:
                        raise AssertionError(f"{method} failed: {answer['error']}")
                    return answer.get("result", {})

    # --- what the tests use ----------------------------------------------------------------------------------

    async def viewport(self, width: int, height: int, mobile: bool = False, dark: bool = False) -> None:
        self.width = width
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=mobile)
        await self.send("Emulation.setEmulatedMedia", media="screen",
                        features=[{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}])

    async def scripts(self, enabled: bool) -> None:
        await self.send("Emulation.setScriptExecutionDisabled", value=not enabled)

    async def open(self, url: str, timeout: float = 20.0) -> None:
        """Navigate and wait until the document has loaded."""
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Polls a script expression until it is truthy, for at most `timeout` seconds; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            await asyncio.sleep(0.1)

    async def dom(self) -> str:
        """The rendered DOM as HTML, after scripts ran (what `chromium --dump-dom` prints)."""
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> tuple[int, int]:
        """A PNG of the whole page, as wide as the emulated viewport; returns its size in CSS pixels."""
        metrics = await self.send("Page.getLayoutMetrics")
        content = metrics.get("cssContentSize") or metrics["contentSize"]
        width, height = self.width, int(math.ceil(content["height"]))
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return width, height

