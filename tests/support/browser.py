"""A real headless Chromium for the page's tests: Debian's ``chromium`` + ``chromedriver`` driven by Selenium.

No browser download ever happens: the binaries are the Debian packages' (``.ci/run`` installs them),
given to Selenium explicitly, so Selenium Manager never looks for a driver online. On a machine
without them the tests skip with the command that installs them, except in CI (``CI=true``),
where a missing browser fails the run instead of passing it silently.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.support import unavailable

log = logging.getLogger(__name__)

INSTALL = "apt-get install chromium chromium-driver"
#: The flags that work on these machines: no sandbox as root, no GPU, and no background traffic
#: (the closed network refuses it, many connections at a time).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
WAIT_S = 90.0  # only catches hangs: a 2-core machine under other tests' load can be slow
T = TypeVar("T")


@dataclass(frozen=True)
class Binaries:
    chromium: str
    chromedriver: str


def find_binaries() -> Binaries | None:
    """Debian's paths first, then PATH (``chromium`` or ``chromium-browser``)."""
    chromium = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                     if p and os.access(p, os.X_OK)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and os.access(p, os.X_OK)),
                  None)
    return Binaries(chromium, driver) if chromium and driver else None


def require_binaries() -> Binaries:
    """The browser, or skip (fail when ``CI=true``) with the command that installs it."""
    found = find_binaries()
    if found is None:
        unavailable(f"no chromium + chromedriver on this machine: {INSTALL} (Debian packages)")
    try:
        import selenium  # noqa: F401
    except ImportError:  # the dev extra is not installed
        unavailable("selenium is not installed: pip install -e '.[dev]'")
    return found


@contextmanager
def chromium(profile: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium in a fresh profile under ``profile``; quit afterwards. Yields the WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = require_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = found.chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile.mkdir(parents=True, exist_ok=True)
    service = Service(found.chromedriver, log_output=str(profile.parent / f"{profile.name}-chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], T], what: str, timeout: float = WAIT_S) -> T:
    """``condition(driver)`` once it is truthy; the timeout only catches hangs (its message says what)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=f"waited for {what}")


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    """The whole page as PNG under ``folder`` (pytest's tmp_path): one file per state a test reaches."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = driver.get_window_size()
    driver.set_window_size(max(size["width"], width), max(size["height"], height + 100))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    log.info("screenshot %s", path)
    return path


def console_errors(driver: Any) -> list[str]:
    """Script errors and policy violations the page caused (failed requests are the page's to show, not these)."""
    entries = driver.get_log("browser")
    noisy = ("Failed to load resource",)  # an HTTP error status is logged by Chromium itself
    return [e["message"] for e in entries if e["level"] == "SEVERE" and not any(n in e["message"] for n in noisy)]


@contextmanager
def slow_uplink(driver: Any, bytes_per_s: int) -> Iterator[None]:
    """Chromium's own network throttling (DevTools protocol) on uploads, restored afterwards."""
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1}
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "uploadThroughput": bytes_per_s})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "uploadThroughput": -1})


def give_files(driver: Any, event: str, files: dict[str, bytes], target: str = "#drop") -> None:
    """Dispatch a ``drop`` or ``paste`` event carrying ``files`` (name -> bytes), as a person's would."""
    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    driver.execute_script(
        """
        const [event, files, selector] = arguments;
        const data = new DataTransfer();
        for (const [name, b64] of Object.entries(files)) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const type = name.endsWith(".png") ? "image/png" : "image/jpeg";
          data.items.add(new File([bytes], name, { type }));
        }
        const target = document.querySelector(selector);
        const e = event === "paste"
          ? new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true })
          : new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
        target.dispatchEvent(e);
        """,
        event, payload, target,
    )


@dataclass
class UiPage:
    """The page at ``/ui`` in ``driver``: uploads and the waits that follow them (no clocks, only states).

    The page marks ``#results`` with ``data-run`` (a counter) and ``data-state`` (busy, done, error),
    and ``#explain-note`` with ``data-state`` (busy, done, unavailable).
    """

    driver: Any
    url: str
    shots: Path

    def open(self) -> UiPage:
        self.driver.get(f"{self.url}/ui")
        wait_for(self.driver, lambda d: d.execute_script(
            "return !document.getElementById('model').disabled || !document.getElementById('error').hidden"),
            "the model list (or its error)")
        console_errors(self.driver)  # drain what an earlier page logged
        return self

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id: str) -> Any:
        return self.driver.find_element("id", element_id)

    def run(self) -> int:
        return int(self.by_id("results").get_attribute("data-run") or 0)

    def upload(self, *paths: Path) -> str:
        """Choose ``paths`` in the file picker; the state the run ends in (done or error)."""
        before = self.run()
        self.by_id("files").send_keys("\n".join(str(p) for p in paths))
        return self.settle(before)

    def settle(self, before: int) -> str:
        """Wait until a run after ``before`` has ended, its heatmap request included."""
        def ended(d: Any) -> str | None:
            state = d.execute_script(
                "const r = document.getElementById('results'), n = document.getElementById('explain-note');"
                "if (Number(r.dataset.run || 0) <= arguments[0] || r.dataset.state === 'busy') return null;"
                "const single = !document.getElementById('single').hidden;"
                "if (r.dataset.state === 'done' && single && !['done', 'unavailable'].includes(n.dataset.state))"
                "  return null;"
                "return r.dataset.state;", before)
            return state
        return wait_for(self.driver, ended, "the page's answer")

    def text(self, selector: str) -> list[str]:
        return self.js("return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", selector)

    def shot(self, name: str) -> Path:
        return screenshot(self.driver, self.shots, name)


@contextmanager
def held_upload(host: str, port: int, path: str) -> Iterator[Callable[[], None]]:
    """An upload that sends its first bytes and waits: with ``IMGCLF_MAX_RECEIVING=1`` it holds the
    worker's only receiving slot, so the page's next upload meets a real 503 with Retry-After.

    Yields ``hold()``, which opens it again if the server answered it instead (another upload had the
    slot first); closing it afterwards frees the slot.
    """
    held: list[socket.socket] = []

    def hold() -> None:
        if held:
            held[0].setblocking(False)
            try:
                held[0].recv(1)  # an answer or EOF: it holds nothing
            except BlockingIOError:
                return  # still waiting for the rest of its body
            held.pop().close()
        sock = socket.create_connection((host, port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: ui\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     "Content-Length: 100000\r\n\r\n--b\r\n".encode())
        held.append(sock)

    try:
        yield hold
    finally:
        for sock in held:
            sock.close()
