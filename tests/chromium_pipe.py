"""Headless Chromium driven over the DevTools protocol on a pipe (no websocket library needed).

`render(url, screenshot=PATH)` loads a page and reports what a person's browser would have
done with it: console messages and errors, every network request the page made, a full-page
screenshot, and the page count when printed to A4 (PDF); it is built on `Page(url)`, which
keeps a page open for a test to evaluate, wait on, screenshot or print while it updates itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars"]


def _fds_3_4(read_end: int, write_end: int) -> None:
    """In the child: put the pipe ends at fds 3 and 4 (moved high first so they cannot clash)."""
    import fcntl

    a = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10)
    b = fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
    os.dup2(a, 3)
    os.dup2(b, 4)


class _Pipe:
    def __init__(self, profile: str) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4.
        self.proc = subprocess.Popen(
            [CHROMIUM or "chromium", *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=lambda: _fds_3_4(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def render(url: str, screenshot: str | Path | None = None, width: int = 1200,
           pdf: str | Path | None = None, evaluate: str | None = None) -> dict[str, Any]:
    """Load `url`; return {"console": [...], "errors": [...], "requests": [...], "pdf_pages": n}
    and, with `evaluate` (a JavaScript expression), its value as "value"."""
    with Page(url, width) as page:
        time.sleep(0.3)  # late console messages
        value = page.evaluate(evaluate or "1")
        height = page.height()
        if screenshot is not None:
            page.screenshot(screenshot)
        data = page.pdf()
        if pdf is not None:
            Path(pdf).write_bytes(data)
        events = list(page.pipe.events)
    console = [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"]
    errors = [e["params"]["exceptionDetails"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"].get("level") in ("error", "warning")]
    errors += [c for c in console if c.get("type") in ("error", "warning", "assert")]
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"console": console, "errors": errors, "requests": requests, "height": height, "value": value,
            "pdf_pages": data.count(b"/Type /Page") - data.count(b"/Type /Pages"),
            "pdf_bytes": len(data)}


class Page:
    """A page kept open for a test to watch: `evaluate` as often as needed while the page
    updates itself, `goto` another address, `screenshot`. A context manager."""

    def __init__(self, url: str, width: int = 1200) -> None:
        self.profile = tempfile.mkdtemp(prefix="cx-chromium-")
        self.pipe = _Pipe(self.profile)
        self.width = width
        try:
            target = self.pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.pipe.send("Target.attachToTarget",
                                          {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.pipe.send(f"{domain}.enable", session=self.session)
            self.pipe.send("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                           session=self.session)
            self.goto(url)
        except BaseException:
            self.close()  # no Chromium left running when the page cannot be opened
            raise

    def goto(self, url: str) -> None:
        self.pipe.events.clear()
        self.pipe.send("Page.navigate", {"url": url}, session=self.session)
        self.pipe.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        answer = self.pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 30, what: str = "") -> Any:
        """Evaluate until the value is truthy (the page polls on its own); return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what or expression}")
            time.sleep(0.2)

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.pipe.events
                if e.get("method") == "Network.requestWillBeSent"]

    def height(self) -> int:
        """The page's full height in CSS pixels."""
        return int(self.pipe.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]["height"])

    def screenshot(self, path: str | Path) -> None:
        """The whole page, not only the 900 px window."""
        self.pipe.send("Emulation.setDeviceMetricsOverride",
                       {"width": self.width, "height": self.height(), "deviceScaleFactor": 1, "mobile": False},
                       session=self.session)
        shot = self.pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                              session=self.session)
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    def pdf(self) -> bytes:
        """The page printed to A4 (the page's own CSS page size first), as Chromium's --print-to-pdf."""
        printed = self.pipe.send("Page.printToPDF", {"paperWidth": 8.27, "paperHeight": 11.69,
                                                     "preferCSSPageSize": True, "printBackground": True},
                                 session=self.session, timeout=60)
        return base64.b64decode(printed["data"])

    def close(self) -> None:
        self.pipe.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
