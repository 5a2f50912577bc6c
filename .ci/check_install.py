"""CI's install checks, as a newcomer meets the project (standard library only).

    python3 .ci/check_install.py demo DIR
        `make demo DEMO_ARGS='--port 0'` in the clone DIR (which creates .venv and installs
        the project): the page is served and live values arrive.
    python3 .ci/check_install.py wheel DIR WORK
        A wheel built from DIR, and `pip install DIR` (not editable), each into a new venv
        under WORK; `coap-ws-gateway demo` from each, run outside DIR so that nothing can come
        from the source tree: the same checks.

Run it under .ci/as-newcomer (no compiler, no autotools, an empty pip cache). Exit status 0
when every check holds; otherwise the failing check and what the process printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

WAIT = 300.0
"""Seconds for the demo to print its URL (the first `make demo` installs everything)."""


class CheckFailed(Exception):
    pass


@contextlib.contextmanager
def running(argv: Sequence[str], cwd: Path) -> Iterator[tuple[str, list[str]]]:
    """Start the demo (in a session of its own, so that make's children end with it) and
    yield its WebSocket URL and the lines it printed."""
    process = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    printed: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_forward, args=(process.stdout, printed), daemon=True).start()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + WAIT
        url = None
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = printed.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # the process ended
                break
            lines.append(line)
            if line.startswith("listening on "):
                url = line.removeprefix("listening on ").strip()
            if line.startswith("try:"):
                break
        if url is None:
            raise CheckFailed(f"{' '.join(argv)} printed no URL:\n" + "\n".join(lines[-40:]))
        yield url, lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _forward(stream: IO[str], printed: queue.Queue[str | None]) -> None:
    for line in stream:
        printed.put(line.rstrip("\n"))
    printed.put(None)


def check_demo(url: str, python: Path) -> None:
    """The page answers with HTML, and the CLI's `subscribe` receives two live values."""
    page = url.removesuffix("/ws").replace("ws", "http", 1) + "/"
    with urllib.request.urlopen(page, timeout=10) as response:
        body = response.read()
        if response.status != 200 or b"<html" not in body.lower():
            raise CheckFailed(f"{page}: status {response.status}, no HTML page")
    # The JavaScript client, its types and the dashboard's files are package data too: a
    # wheel without them 404s.
    for name, marker in (("client.js", b"export class GatewayClient"),
                         ("client.d.ts", b"export class GatewayClient"),
                         ("dashboard.js", b'from "/client.js"'),
                         ("dashboard.css", b".resources"),
                         ("favicon.svg", b"<svg")):
        with urllib.request.urlopen(page + name, timeout=10) as response:
            if response.status != 200 or marker not in response.read():
                raise CheckFailed(f"{page}{name}: status {response.status}, not the file")
    done = subprocess.run(
        [str(python), "-m", "translator", "subscribe", url, "demo/temperature", "--count", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    notifies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    values = [f.get("value") for f in notifies if f.get("type") == "notify"]
    if done.returncode != 0 or len(values) != 2 or not all(
        isinstance(v, float) for v in values
    ):
        raise CheckFailed(f"no live values from {url}: exit {done.returncode}\n"
                          f"{done.stdout}\n{done.stderr}")
    print(f"  ok: {page} serves the page; {url} sent live values {values}")


def demo(clone: Path) -> None:
    with running(["make", "demo", "DEMO_ARGS=--port 0"], clone) as (url, _):
        check_demo(url, clone / ".venv" / "bin" / "python")


def wheel(source: Path, work: Path) -> None:
    dist = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist),
         str(source)])
    (built,) = dist.glob("coap_ws_gateway-*.whl")
    for name, target in (("from the wheel", str(built)), ("pip install DIR", str(source))):
        venv = work / f"venv {name}"
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", target])
        print(f"- installed {name}")
        with running([str(venv / "bin" / "coap-ws-gateway"), "demo", "--port", "0"], work) as (
            url, _,
        ):
            check_demo(url, venv / "bin" / "python")


def run(argv: Sequence[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}\n"
                          f"{done.stderr}")


def main(argv: Sequence[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "demo":
            demo(Path(argv[1]))
        elif len(argv) == 3 and argv[0] == "wheel":
            wheel(Path(argv[1]).resolve(), Path(argv[2]).resolve())
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (CheckFailed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        print(f"check_install {argv[0]}: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
