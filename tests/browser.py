"""Headless Chromium for the web UI's tests: Debian's `chromium`, driven by Playwright.

The browser is the system's (`apt-get install chromium`; .ci/run installs it), never one that
Playwright downloads. Without it the tests skip with the reason -- except in CI (`CI` set),
where a missing browser is a failure: the web UI's tests must never be skipped there.

Screenshots go to $TILLER_WEBUI_ARTIFACTS (created if needed), or a pytest temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser")
ARTIFACTS_ENV = "TILLER_WEBUI_ARTIFACTS"


def chromium_path() -> str:
    """The system Chromium's path; skips the test without one (fails in CI)."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    reason = ("no system Chromium (apt-get install chromium; .ci/run installs it), needed to "
              "drive the web UI")
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $TILLER_WEBUI_ARTIFACTS, or a temporary folder."""
    folder = os.environ.get(ARTIFACTS_ENV)
    path = Path(folder) if folder else tmp_path_factory.mktemp("webui-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def launched(executable: str) -> Iterator:
    """A running headless Chromium (a Playwright Browser) for a module's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # NOTE: --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()
