"""A real browser for the dashboard's tests and its screenshot: Playwright driving the
system's Chromium (Debian's `chromium` package), headless.

Playwright's own browser builds are never downloaded (they cannot be, on the machines this
project runs on): the browser is the one this module finds, passed as `executable_path`.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from playwright.async_api import Browser, Playwright

CHROMIUM_ENV: Final = "GATEWAY_CHROMIUM"
"""An environment variable naming the Chromium to use, where it is not on PATH."""

LAUNCH_ARGS: Final = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
"""Headless, and nothing that reaches beyond loopback (updates, sync, field trials); no
sandbox, since the tests run as root in CI, where Chromium's sandbox refuses to start."""

_CANDIDATES: Final = ("chromium", "chromium-browser", "/usr/bin/chromium")


def chromium_path() -> str | None:
    """The Chromium executable: $GATEWAY_CHROMIUM, else `chromium` on PATH, else None."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed"
    if chromium_path() is None:
        configured = os.environ.get(CHROMIUM_ENV)
        if configured:
            return f"${CHROMIUM_ENV} ({configured}) is not an executable"
        return f"no Chromium (${CHROMIUM_ENV}, or chromium on PATH)"
    return None


async def launch(playwright: Playwright) -> Browser:
    """A headless Chromium (call `browser_missing()` first)."""
    executable = chromium_path()
    assert executable is not None
    return await playwright.chromium.launch(
        executable_path=executable, headless=True, args=list(LAUNCH_ARGS)
    )
