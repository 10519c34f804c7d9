"""A headless Chromium driven over the DevTools protocol (a websocket), for
tests that must see a page as a browser renders it: the DOM after scripts
ran, images decoded, console errors and uncaught exceptions collected.

Debian's `chromium` is the browser (`apt-get install chromium`); playwright
and pyppeteer cannot download theirs without a network."""
from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import websocket

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser with one page. ``errors`` collects console errors and uncaught exceptions."""

    def __init__(self, timeout: float = 60.0):
        if BROWSER is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self.process = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*",
             "--window-size=1400,900", f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._wait_for_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def _wait_for_port(self) -> int:
        active = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if active.is_file() and active.read_text().strip():
                return int(active.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.socket.recv())
        if "method" in message:
            self.events.append(message)
            params = message["params"]
            if message["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details["text"])
            elif message["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif message["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(f"{params['entry']['source']}: {params['entry']['text']}")
        return message

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self.ids)
        self.socket.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def wait_for_event(self, method: str) -> dict[str, Any]:
        seen = len(self.events)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event["params"]
            seen = len(self.events)
            self._receive()
        raise TimeoutError(f"no {method} within {self.timeout} s")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str, context_id: int | None = None) -> Any:
        """The value of a JavaScript expression (awaited if a promise) in the page, or in an execution context."""
        extra = {"contextId": context_id} if context_id is not None else {}
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, **extra)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, context_id: int | None = None) -> Any:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression, context_id)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression!r} stayed false for {self.timeout} s")

    def child_frame_context(self) -> int:
        """An execution context in the page's first child frame (an iframe, whatever its origin)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            children = self.send("Page.getFrameTree")["frameTree"].get("childFrames", [])
            if children:
                world = self.send("Page.createIsolatedWorld", frameId=children[0]["frame"]["id"])
                return world["executionContextId"]
            time.sleep(0.2)
        raise TimeoutError("the page has no child frame")

    def screenshot(self, out: Path) -> Path:
        import base64

        out.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return out

    def close(self) -> None:
        """Ends the browser and every process it started, then removes its profile.

        The renderer, GPU and crashpad processes outlive the browser process for a moment and
        keep writing into the profile (CI: removing it failed with "Directory not empty"), so
        the profile goes only once the whole tree has exited."""
        try:
            self.socket.close()
        finally:
            try:
                tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            self.process.terminate()
            _, alive = psutil.wait_procs(tree, timeout=10)
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(alive, timeout=10)
            self.process.wait()
            self.profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
