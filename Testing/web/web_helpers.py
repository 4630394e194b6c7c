"""Helpers for the ``fmabs web`` tests: Debian chromium, the server process, free ports (own module: two
conftest.py files in Testing/ would make "from conftest import" ambiguous)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FMABS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: screenshots of each panel end up here too (the README's picture is copied from a run)
ARTEFACTS = Path(os.environ.get("FMABS_WEB_ARTEFACTS", tempfile.gettempdir())) / "fmabs-web-artefacts"


def need_web() -> None:
    for module, what in (("trame_slicer", 'the web extra: pip install -e ".[web]"'),
                         ("playwright", 'Playwright: pip install -e ".[test]"')):
        try:
            __import__(module)
        except Exception as exc:  # ImportError, or a broken binary (LayerDM against another slicer-core)
            pytest.skip(f"{module} is not usable ({exc}); install {what}")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fmabs web`` in its own process; its output goes to a log file kept for failures."""

    def __init__(self, project: Path, log: Path, *extra: str, host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.log = log
        argv = [sys.executable, "-m", "fmabs_core", "web", "--project", str(project), "--host", host,
                "--port", str(self.port), *extra]
        self.handle = open(log, "wb")
        self.process = subprocess.Popen(argv, stdout=self.handle, stderr=subprocess.STDOUT, cwd=project.parent)

    def url_line(self, timeout_s: float = 120.0) -> str:
        """The URL the server printed, once it answers HTTP."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"fmabs web exited with {self.process.returncode}:\n{self.output()}")
            line = next((ln for ln in self.output().splitlines() if "fmabs web: serving" in ln), None)
            if line:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{self.port}/fmabs/ping", timeout=2)
                except urllib.error.HTTPError:  # any HTTP answer (404, 401) means it listens
                    return line.split(" at ", 1)[1].strip()
                except OSError:
                    pass
            time.sleep(0.3)
        raise AssertionError(f"fmabs web did not start in {timeout_s:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.handle.close()


# ---- the page: what a user does, and waiting for what they would see -----------------------------------
def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, pattern: str, timeout_s: float = 60.0) -> str:
    """Wait until the element's text matches ``pattern`` (a regex); returns the text."""
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            last = text_of(page, selector)
        except Exception:  # noqa: BLE001 - not rendered yet
            last = ""
        if re.search(pattern, last):
            return last
        page.wait_for_timeout(250)
    message = text_of(page, "#message") if page.locator("#message").count() else ""
    raise AssertionError(f"{selector}: {pattern!r} not seen in {timeout_s:.0f} s; last text {last!r}; message {message!r}")


def shot(page, name: str, folder: Path = ARTEFACTS, settle_s: float = 30.0) -> Path:
    """A PNG of the page once the views have streamed their last frame: two captures a second apart are the
    same (the server renders each change and streams it; on a busy machine that takes seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(700)
    last = page.screenshot()
    deadline = time.time() + settle_s
    while time.time() < deadline:
        page.wait_for_timeout(1000)
        now = page.screenshot()
        if now == last:
            break
        last = now
    path = folder / f"{name}.png"
    path.write_bytes(last)
    return path


def tab(page, key: str) -> None:
    page.click(f"#tab-{key}")
    page.wait_for_timeout(300)


def fill(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.locator(selector).blur()
    page.wait_for_timeout(200)


def choose(page, select_id: str, option: str) -> None:
    """Pick the first option whose title starts with ``option`` in the drop-down list whose input is ``#select_id``
    (a scan's title may say more than its name, e.g. that it is cross-labelled)."""
    page.locator(".v-field", has=page.locator(f"#{select_id}")).click()
    page.get_by_role("option", name=re.compile("^" + re.escape(option))).first.click()
    page.wait_for_timeout(300)


@contextlib.contextmanager
def chromium_page(profile: Path, width: int = 1500, height: int = 900) -> Iterator:
    """A fresh headless Debian chromium page with its own profile folder; ``page.errors`` collects page errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height}, accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        try:
            yield page
        finally:
            context.close()
