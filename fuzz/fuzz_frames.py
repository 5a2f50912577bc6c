"""Coverage-guided fuzzing (atheris/libFuzzer) of what a client or a sensor can send.

Run it with ``make fuzz`` (60 s; ``make fuzz FUZZ_SECONDS=600`` for longer), or directly::

    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60 CORPUS_DIR fuzz/seeds/frames
    .venv/bin/python fuzz/fuzz_frames.py fuzz/crashes/crash-...   # replay one input

The first byte of an input picks the target; everything else is a WebSocket text frame:

=========  ===================================================================================
``\\x01``   the rest is a *binary* WebSocket frame for :func:`translator.core.frames.parse`
``\\x02``   two bytes of content-format (big endian; ``0xffff`` = none), then a CoAP payload
           for :func:`translator.core.codecs.decode_payload`; the notify built from it must be
           sendable
``\\x03``   the rest (as text) is a URI and an allow pattern for :mod:`translator.core.uris` and
           :mod:`translator.core.policy`
other      the whole input, as UTF-8 text, is a client frame for ``frames.parse``; accepted
           frames go on to URI parsing, the policy and ``encode_value``
=========  ===================================================================================

A crash is any exception other than the documented ones (``FrameError``, ``UriError``,
``PatternError``, ``UnsupportedValue``), and any reply that would not be sendable (not UTF-8
encodable, not strict JSON). Without atheris (no wheel for the platform) the script still
runs: it mutates the seeds at random for the same time, without coverage feedback.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the platform
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["translator"]):
        from translator.core import codecs, frames, policy, uris
else:
    from translator.core import codecs, frames, policy, uris

ERROR_CODES = {
    frames.BAD_REQUEST,
    frames.NOT_FOUND,
    frames.FORBIDDEN,
    frames.TIMEOUT,
    frames.UPSTREAM_ERROR,
    frames.UNSUPPORTED,
    frames.LIMIT,
}
POLICY = policy.Policy(
    allow=("coap://127.0.0.1:5683/*", "coap://*.lan:5683/*", "coap://[ff02::fd]:5683/*"),
    sensor_uris=frozenset({"coap://127.0.0.1:5683/temperature"}),
)
TS = 1_700_000_000.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} in gateway output")


def sendable(text: str) -> Any:
    """Check that gateway output can go into a WebSocket text frame as strict JSON."""
    text.encode("utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def check_frame_text(text: str) -> None:
    try:
        frame = frames.parse(text)
    except frames.FrameError as error:
        assert error.code in ERROR_CODES, error.code
        reply = sendable(error.to_frame().serialize())
        assert reply["id"] == error.frame_id
        return
    reply = sendable(frames.Pong(frame.id).serialize())
    assert reply["id"] == frame.id
    if isinstance(frame, frames.Subscribe | frames.Request) and frame.uri is not None:
        check_uri(frame.uri)
    if isinstance(frame, frames.Request) and frame.has_value:
        assert frame.cf is not None
        try:
            payload = codecs.encode_value(frame.cf, frame.value)
        except codecs.UnsupportedValue:
            return
        assert isinstance(payload, bytes)
        check_payload(frame.cf, payload)


def check_uri(text: str, pattern: str | None = None) -> None:
    try:
        uri = uris.parse_coap_uri(text)
    except uris.UriError:
        return
    assert uris.parse_coap_uri(str(uri)) == uri, "normalization is not idempotent"
    decision = POLICY.decide(uri)
    assert decision.allowed is POLICY.allows(str(uri))
    if pattern is None:
        return
    try:
        compiled = policy.compile_pattern(pattern)
    except policy.PatternError:
        return
    literal = policy.pattern_literal_host(pattern)
    if compiled.matches(uri):
        assert literal is None or literal == uri.host, (pattern, str(uri))
        allowed = policy.Policy(allow=(pattern,)).allows(uri)
        special = policy.special_address_kind(uri.host) is not None
        assert allowed is (not special or literal == uri.host)


def check_payload(cf: int | None, payload: bytes) -> None:
    body = codecs.decode_payload(cf, payload, ts=TS)
    assert set(body) <= {"value", "payload_b64", "decode_error"}, body
    notify = frames.Notify(
        sub="s1", uri="coap://h:5683/x", seq=1, code="2.05", cf=cf, body=body, ts=TS, max_age=60
    )
    sendable(notify.serialize())


def test_one_input(data: bytes) -> None:
    """The fuzz target: raises only on a bug."""
    if not data:
        check_frame_text("")
        return
    kind, rest = data[0], data[1:]
    if kind == 1:
        try:
            frames.parse(rest)
        except frames.FrameError as error:
            assert error.code == frames.BAD_REQUEST
            sendable(error.to_frame().serialize())
            return
        raise AssertionError("a binary frame was accepted")
    if kind == 2:
        number = int.from_bytes(rest[:2], "big") if len(rest) >= 2 else 0xFFFF
        check_payload(None if number == 0xFFFF else number, rest[2:])
        return
    if kind == 3:
        uri, _, pattern = rest.decode("utf-8", "replace").partition(" ")
        check_uri(uri, pattern or None)
        return
    check_frame_text(data.decode("utf-8", "replace"))


def _fallback(argv: list[str], target: Callable[[bytes], None]) -> None:
    """Without atheris: replay files, or mutate the seeds at random for -max_total_time."""
    seconds = 60.0
    paths: list[Path] = []
    for arg in argv[1:]:
        if arg.startswith("-max_total_time="):
            seconds = float(arg.partition("=")[2])
        elif not arg.startswith("-"):
            paths.append(Path(arg))
    seeds: list[bytes] = []
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        seeds.extend(p.read_bytes() for p in files)
    if paths and all(p.is_file() for p in paths):
        for seed in seeds:
            target(seed)
        print(f"replayed {len(seeds)} inputs without a crash")
        return
    print("atheris is not installed: random mutation of the seeds, no coverage feedback")
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")) or None)
    seeds = seeds or [b"{}"]
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            position = rng.randint(0, len(data))
            action = rng.randint(0, 3)
            if action == 0 and data:
                del data[position % len(data)]
            elif action == 1:
                data[position:position] = bytes([rng.randint(0, 255)])
            elif action == 2:
                data[position:position] = rng.choice(
                    [b"[", b"{", b'"', b"\\ud800", b"1e400", b"*", b"%", b"?", b"\x81" * 300]
                )
            else:
                other = rng.choice(seeds)
                data[position:] = other[rng.randint(0, len(other)) :]
        try:
            target(bytes(data))
        except Exception:
            print(f"crash on input {bytes(data)!r}")
            raise
        runs += 1
    print(f"{runs} runs without a crash")


def main() -> None:
    if atheris is None:
        _fallback(sys.argv, test_one_input)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
