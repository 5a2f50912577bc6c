"""The dashboard's files (issue 14 §3): how the gateway serves the page's script, style and
icon, and what the script may not do. The page itself runs in a real browser in
tests/test_dashboard_browser.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from translator.web.front import PAGE_FILES, PLAIN_CSP, answer_request, parse_head, static_bytes

FILES = {
    "/dashboard.js": "text/javascript; charset=utf-8",
    "/dashboard.css": "text/css; charset=utf-8",
    "/favicon.svg": "image/svg+xml",
}


def answer(method: str, path: str) -> Any:
    head = parse_head(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return answer_request(head)


def test_every_file_the_page_loads_is_listed() -> None:
    assert set(PAGE_FILES) == set(FILES)
    page = static_bytes("index.html").decode()
    for path in FILES:
        assert f'"{path}"' in page, path


@pytest.mark.parametrize(("path", "content_type"), FILES.items())
def test_the_page_files_are_served(path: str, content_type: str) -> None:
    got = answer("GET", path)
    headers = dict(got.headers)
    assert got.status == 200 and got.body == static_bytes(path.lstrip("/"))
    assert headers["Content-Type"] == content_type
    assert headers["Content-Length"] == str(len(got.body))
    assert headers["Cache-Control"] == "no-cache"
    # The headers of every answer; and no CORS: only the page itself loads them.
    assert headers["Content-Security-Policy"] == PLAIN_CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "Access-Control-Allow-Origin" not in headers
    headed = answer("HEAD", f"{path}?v=2")
    assert headed.status == 200 and headed.body == b"" and headed.headers == got.headers
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        refused = answer(method, path)
        assert refused.status == 405 and ("Allow", "GET, HEAD") in refused.headers


def test_nothing_else_next_to_them_is_served() -> None:
    for path in ("/dashboard", "/dashboard.js/", "/static/dashboard.js", "/favicon.ico",
                 "/index.css"):
        assert answer("GET", path).status == 404, path


def test_the_script_builds_the_page_from_text_never_from_html() -> None:
    # Names, URIs and values come from sensors and configuration: written as text
    # (textContent, attributes), never parsed as HTML, and no code is made from strings.
    script = static_bytes("dashboard.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute(\"style\"", ".style."):
        assert sink not in script, sink
    # It imports the gateway's own client, and nothing from elsewhere.
    assert re.findall(r'^import .* from "([^"]+)";$', script, re.MULTILINE) == ["/client.js"]
