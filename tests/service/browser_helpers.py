"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, for the
search page tests: launch with the project's flags and a fresh profile, wait by condition, read the
browser console and what the page transferred."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def browser_missing() -> str | None:
    """Why the browser tests are skipped: only where the set-up cannot install Chromium (no apt-get).
    With apt-get and no browser, the tests run and fail: `make test` installs it."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing and shutil.which("apt-get") is None:
        return f"{' and '.join(missing)} not installed and no apt-get to install chromium + chromium-driver"
    return None


@contextmanager
def chromium(width: int = 1360, height: int = 1000) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile; console messages of every level are kept."""
    profile = tempfile.mkdtemp(prefix="page-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], what: str, timeout_s: float = 30):
    """The condition's truthy value, polled by Selenium until timeout_s (then a failure naming `what`)."""
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"timed out after {timeout_s:.0f} s waiting for {what}"
    )


def text_of(driver: WebDriver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


_NETWORK_ERROR = re.compile(
    r"^(\S+) - Failed to load resource: (?:the server responded with a status of (\d+)|(net::\S+))"
)


@dataclass
class Console:
    """Everything the page wrote to the browser console, and the failed requests Chrome logs there."""

    entries: list[dict] = field(default_factory=list)

    def collect(self, driver: WebDriver) -> None:
        self.entries.extend(driver.get_log("browser"))

    def unexpected_errors(self, expected_failures: Iterable[tuple[str, str]] = ()) -> list[str]:
        """SEVERE entries other than failed requests the test caused on purpose: (path, status or
        net:: error) pairs, e.g. ("/images", "401")."""
        allowed = set(expected_failures)
        problems = []
        for entry in self.entries:
            if entry["level"] != "SEVERE":
                continue
            match = _NETWORK_ERROR.match(entry["message"])
            if match and (urlsplit(match[1]).path, match[2] or match[3]) in allowed:
                continue
            problems.append(entry["message"])
        return problems


PAGE_WEIGHT_SCRIPT = """
const entries = [performance.getEntriesByType('navigation')[0], ...performance.getEntriesByType('resource')];
return entries.map(e => ({url: e.name, transfer: e.transferSize, body: e.encodedBodySize}));
"""


def transferred(driver: WebDriver) -> list[dict]:
    """Every request of this page load with its bytes over the wire (headers + body) and body size."""
    return driver.execute_script(PAGE_WEIGHT_SCRIPT)
