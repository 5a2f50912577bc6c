"""The benchmark harness cannot rot: its CoAP codec against aiocoap, and a tiny real run.

The smoke run starts real processes (the fast sensor, the gateway, the bare websockets
baseline, a load generator) for a fan-out to N = 2 clients of about two seconds each. It
checks that the harness works and its numbers are sane, never a speed: this machine is
shared and small.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from websockets.asyncio.server import serve

from bench import fast_sensor as fs
from bench import floor
from bench.bare_ws import BareServer
from bench.control import Histogram
from bench.floor import bursts
from bench.loadgen import NativeReader, NativeUnavailable, client_frame
from bench.slow_reader import SlowClient

from .optional import need

ROOT = Path(__file__).resolve().parent.parent


def coap(mtype: Type, mid: int, token: bytes = b"", **fields: Any) -> bytes:
    """An encoded message as aiocoap builds it (message layer fields set afterwards, since
    aiocoap deprecates passing them to the constructor)."""
    message = aiocoap.Message(**fields)
    message.mtype, message.mid, message.token = mtype, mid, token
    return bytes(message.encode())


# -- the fast sensor's message format ---------------------------------------------------------


def test_notification_decodes_with_aiocoap() -> None:
    sent: list[tuple[bytes, Any]] = []

    class Transport:
        def sendto(self, data: bytes, addr: Any) -> None:
            sent.append((data, addr))

    sensor = fs.FastSensor(resources=2, rate=0)
    sensor.transport = Transport()  # type: ignore[assignment]
    register = coap(Type.CON, 0x1234, b"\x01\x02\x03", code=Code.GET,
                    uri="coap://127.0.0.1/r/1", observe=0)
    sensor.datagram_received(register, ("127.0.0.1", 40000))
    answer = aiocoap.Message.decode(sent[-1][0])
    assert (answer.mtype, answer.code, answer.mid) == (Type.ACK, Code.CONTENT, 0x1234)
    assert answer.token == b"\x01\x02\x03"
    assert answer.opt.observe is not None
    assert answer.opt.content_format == 60
    assert set(cbor2.loads(answer.payload)) == {"t", "n"}

    sensor._notify(sensor.resources["/r/1"])
    sensor._notify(sensor.resources["/r/1"])
    first, second = (aiocoap.Message.decode(data) for data, _ in sent[-2:])
    for note in (first, second):
        assert (note.mtype, note.code, note.token) == (Type.NON, Code.CONTENT, b"\x01\x02\x03")
        assert note.opt.content_format == 60
    assert second.opt.observe == first.opt.observe + 1 > answer.opt.observe
    assert cbor2.loads(second.payload)["n"] == cbor2.loads(first.payload)["n"] + 1
    assert sent[-1][1] == ("127.0.0.1", 40000)

    # RST to a notification deregisters (RFC 7641 §3.6)
    sensor.datagram_received(coap(Type.RST, second.mid, code=Code.EMPTY), ("127.0.0.1", 40000))
    assert sensor.stats()["observers"] == 0


def test_observe_number_wraps_at_24_bits() -> None:
    sent: list[bytes] = []

    class Transport:
        def sendto(self, data: bytes, addr: Any) -> None:
            sent.append(data)

    sensor = fs.FastSensor(resources=1, rate=0)
    sensor.transport = Transport()  # type: ignore[assignment]
    resource = sensor.resources["/r/0"]
    resource.observers[(("127.0.0.1", 1), b"\x07")] = None
    resource.observe = 0xFFFFFF
    sensor._notify(resource)
    sensor._notify(resource)
    observes = [aiocoap.Message.decode(data).opt.observe for data in sent]
    assert observes == [0xFFFFFF, 0]


def test_deregistration_with_observe_1() -> None:
    sent: list[bytes] = []

    class Transport:
        def sendto(self, data: bytes, addr: Any) -> None:
            sent.append(data)

    sensor = fs.FastSensor(resources=1, rate=0)
    sensor.transport = Transport()  # type: ignore[assignment]
    addr = ("127.0.0.1", 5)
    for observe in (0, 1):
        request = coap(Type.NON, 7 + observe, b"tk", code=Code.GET,
                       uri="coap://127.0.0.1/r/0", observe=observe)
        sensor.datagram_received(request, addr)
    assert sensor.stats()["observers"] == 0
    assert sensor.stats()["deregistrations"] == 1
    reply = aiocoap.Message.decode(sent[-1])
    assert reply.mtype == Type.NON and reply.code == Code.CONTENT and reply.opt.observe is None


def test_decodes_requests_from_aiocoap_with_extended_options() -> None:
    long_segment = "s" * 300  # a length in the 2-byte extension
    request = aiocoap.Message(code=Code.PUT, uri=f"coap://127.0.0.1/r/{long_segment}/x",
                              payload=b"\xa1")
    request.opt.content_format = 60
    request.opt.size1 = 1  # option 60: delta in the 1-byte extension
    request.opt.no_response = 26  # option 258: delta 198 from 60, 1-byte extension
    request.mtype, request.mid, request.token = Type.CON, 65535, b"12345678"
    decoded = fs.decode(request.encode())
    assert (decoded.mtype, decoded.code, decoded.mid, decoded.token) == (
        fs.CON, fs.PUT, 65535, b"12345678")
    assert decoded.path == f"/r/{long_segment}/x"
    assert decoded.option_uint(fs.CONTENT_FORMAT) == 60
    assert decoded.option_uint(60) == 1
    assert decoded.option_uint(258) == 26
    assert decoded.payload == b"\xa1"
    assert fs.encode(decoded) == request.encode()


def test_options_with_large_deltas_round_trip() -> None:
    message = fs.Message(fs.CON, fs.GET, 1, b"", [(11, b"a" * 20), (2049, b"z" * 400)], b"p")
    assert fs.decode(fs.encode(message)) == message
    again = aiocoap.Message.decode(fs.encode(message))
    assert again.opt.uri_path == ("a" * 20,)


@pytest.mark.parametrize("data", [b"", b"\x40\x01", b"\x80\x01\x00\x00", b"\x49\x01\x00\x00",
                                  b"\x41\x01\x00\x00", b"\x40\x01\x00\x00\xff",
                                  b"\x40\x01\x00\x00\xd1", b"\x40\x01\x00\x00\xf0"])
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(fs.MessageError):
        fs.decode(data)


def test_cbor_payloads() -> None:
    assert cbor2.loads(fs.cbor_payload(1.5, 7)) == {"t": 1.5, "n": 7}
    padded = fs.cbor_payload(2.0, 2**32 + 3, b"x" * 1000)
    assert cbor2.loads(padded) == {"t": 2.0, "n": 3, "p": "x" * 1000}


def test_client_frames_are_masked() -> None:
    frame = client_frame(b"hello")
    assert frame[0] == 0x81 and frame[1] == 0x80 | 5
    mask, body = frame[2:6], frame[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == b"hello"
    assert client_frame(b"x" * 300)[1:4] == bytes((0x80 | 126, 1, 44))


def test_histogram_percentiles() -> None:
    histogram = Histogram()
    for ms in range(1, 101):
        histogram.add(ms / 1000)
    merged = Histogram.merged([histogram.to_json(), histogram.to_json()])
    assert merged.count == 200
    p50, p99 = merged.percentile(0.5), merged.percentile(0.99)
    assert p50 is not None and 0.049 <= p50 <= 0.052
    assert p99 is not None and 0.098 <= p99 <= 0.1
    assert Histogram().percentile(0.5) is None


# -- a tiny real run --------------------------------------------------------------------------


def test_smoke_run_of_the_harness(tmp_path: Path) -> None:
    env = dict(os.environ)
    try:  # the load generators must use the native reader when it builds here
        NativeReader().close()
        env["BENCH_LOADGEN_READER"] = "native"
    except NativeUnavailable:
        env["BENCH_LOADGEN_READER"] = "python"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["errors"] == []
    runs = {r["system"]: r for r in result["runs"] if r["scenario"] == "fanout"}
    assert set(runs) == {"gateway", "bare_ws"}
    for run in runs.values():
        assert run["n"] == 2
        assert run["deliveries"] > 0
        assert run["offered_updates"] > 0
        assert 0 < run["share"] <= 1.05
        assert run["p50_ms"] is not None and run["p50_ms"] >= 0
        assert run["closed_clients"] == 0
    assert runs["gateway"]["cpu_us_per_delivery"] is not None
    assert "Fan-out" in proc.stdout and "Targets" in proc.stdout


def test_the_floor_times_bursts_of_writes_to_a_reader_in_another_process() -> None:
    result = bursts(clients=20, count=3, interval=0.0)
    assert result["burst_clients"] == 20
    writers = ["python"] if "burst_c_error" in result else ["python", "c", "c_2threads"]
    for writer in writers:
        assert 0 < result[f"burst_{writer}_p50_ms"] <= result[f"burst_{writer}_p99_ms"]
        assert result[f"burst_{writer}_p99_ms"] <= result[f"burst_{writer}_p999_ms"]
        assert result[f"burst_{writer}_us_per_write"] > 0


def test_the_floor_times_repeated_pure_cpu_work() -> None:
    result = floor.hiccups(count=5, chunk=0.001, pause=0.0)
    assert result["hiccup_count"] == 5
    assert 0 < result["hiccup_p50_ms"] <= result["hiccup_p99_ms"] <= result["hiccup_max_ms"]
    assert 0 <= result["hiccup_over_2x_median_pct"] <= 100


def test_the_floors_c_writer_writes_the_whole_frame_to_each_client_in_order() -> None:
    try:
        write_each = floor._c_writer()
    except NativeUnavailable as exc:
        need("cc", f"the floor's C writer cannot be built: {exc}")
        raise
    pairs = [socket.socketpair() for _ in range(3)]
    for _, theirs in pairs:
        theirs.settimeout(5)
    try:
        fds = (ctypes.c_int * 3)(*[ours.fileno() for ours, _ in pairs])
        done = (ctypes.c_int64 * 3)()
        before = time.monotonic_ns()
        assert write_each(fds, 3, b"frame", 5, done) == 3
        assert before <= done[0] <= done[1] <= done[2] <= time.monotonic_ns()
        assert [theirs.recv(16) for _, theirs in pairs] == [b"frame"] * 3
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def test_a_slow_reader_takes_one_message_per_tick_and_reports_the_ages() -> None:
    """bench.slow_reader against the bare broadcast server in this process: it subscribes,
    reads at its pace, answers with ages per window (numbers come out, not a speed)."""
    bare = BareServer(rate=200.0)
    async with serve(bare.handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        runner = asyncio.create_task(bare.run(time.monotonic() + 30))
        client = await SlowClient.open(f"ws://127.0.0.1:{port}/ws", rate=50.0, rcvbuf=4096)
        try:
            await client.subscribe("coap://127.0.0.1:5683/r/0")
            client.window_start = time.monotonic()
            client.reader = asyncio.create_task(client.read())
            async with asyncio.timeout(10):
                while len(client.samples) < 10:
                    client.sampled.clear()
                    await client.sampled.wait()
            report = client.report(window=0.1, elapsed=time.monotonic() - client.window_start)
        finally:
            runner.cancel()
            if client.reader is not None:
                client.reader.cancel()
            client.sock.close()
    assert report["rate"] == 50.0 and report["frames"] >= 10 and report["closed"] == ""
    assert report["windows"] and all(w["p50_s"] >= 0 for w in report["windows"])
    assert report["mean_seq_step"] is not None and report["mean_seq_step"] >= 1
