"""The command line as a user runs it: real processes, real sensors, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from translator.cli import build_parser, main
from translator.sim import SimulatedSensors

from .conftest import WAIT

CLI = [sys.executable, "-m", "translator"]


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Served:
    """A `coap-ws-gateway serve` (or `demo`) process and its announced URL."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, lines: list[str]) -> None:
        self.process = process
        self.url = url
        self.lines = lines

    async def terminate(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            return await self.process.wait()


async def start_process(*args: str) -> Served:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(WAIT * 2):
            while True:
                raw = await process.stdout.readline()
                if not raw:
                    assert process.stderr is not None
                    err = await process.stderr.read()
                    raise AssertionError(f"process ended early: {err.decode()}")
                line = raw.decode().strip()
                lines.append(line)
                if line.startswith("listening on "):
                    return Served(process, line.removeprefix("listening on "), lines)
    except BaseException:
        process.kill()
        await process.wait()
        raise


@pytest_asyncio.fixture
async def served(sensors: SimulatedSensors, tmp_path: Path) -> AsyncIterator[Served]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
linger = 0

[[sensors]]
name = "kitchen/temperature"
uri = "{sensors.base_uri}/temperature"
observe = true

[[sensors]]
name = "led"
uri = "{sensors.base_uri}/led"

[policy]
allow = ["{sensors.base_uri}/*"]
"""
    )
    process = await start_process("serve", "--config", str(config), "--log-level", "warning")
    try:
        yield process
    finally:
        if process.process.returncode is None:
            process.process.kill()
            await process.process.wait()


async def test_serve_from_config_prints_one_ready_line(served: Served) -> None:
    assert served.lines == [f"listening on {served.url}"]
    assert served.url.startswith("ws://127.0.0.1:") and served.url.endswith("/ws")
    assert not served.url.endswith(":0/ws")


async def test_subscribe_subcommand_prints_notify_lines(
    sensors: SimulatedSensors, served: Served
) -> None:
    code, out, _ = await run_cli("subscribe", served.url, "kitchen/temperature", "--count", "3")
    frames = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(frames) == 3
    assert all(f["type"] == "notify" and f["cf"] == 60 for f in frames)
    assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)

    uri = f"{sensors.base_uri}/led"
    code, out, _ = await run_cli("subscribe", served.url, uri, "--count", "1")
    notifies = [f for f in map(json.loads, out.splitlines()) if f["type"] == "notify"]
    assert code == 0 and [f["uri"] for f in notifies] == [uri]


async def test_subscribe_compact_prints_compact_notifies_after_the_first(
    served: Served,
) -> None:
    code, out, _ = await run_cli("subscribe", served.url, "kitchen/temperature", "--count", "3",
                                 "--compact")
    frames = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(frames) == 3
    assert frames[0]["cf"] == 60 and "uri" in frames[0]
    # Seq-consecutive updates with nothing changed but the value: only what moved.
    later = [f for f in frames[1:] if f["seq"] == frames[0]["seq"] + frames[1:].index(f) + 1]
    assert later and all(set(f) == {"type", "sub", "seq", "value", "ts"} for f in later)


async def test_subscribe_timeout(sensors: SimulatedSensors, served: Served) -> None:
    # Without --count, the timeout is how long to watch: exit 0.
    code, out, _ = await run_cli("subscribe", served.url, "kitchen/temperature",
                                 "--timeout", "0.5")
    assert code == 0 and any(json.loads(line)["type"] == "notify" for line in out.splitlines())
    # With --count, not reaching it in time is a failure.
    code, _, err = await run_cli("subscribe", served.url, "kitchen/temperature",
                                 "--count", "100000", "--timeout", "0.5")
    assert code == 1 and "fewer than 100000 notify frames within 0.5 s" in err


async def test_subscribe_ends_with_exit_1_on_a_resource_that_is_not_there(
    sensors: SimulatedSensors, served: Served
) -> None:
    code, out, _ = await run_cli("subscribe", served.url, f"{sensors.base_uri}/missing",
                                 timeout=30)
    frames = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert frames[-1]["type"] == "status" and frames[-1]["state"] == "offline"
    assert frames[-1]["code"] == "4.04"


async def test_list_subcommand(sensors: SimulatedSensors, served: Served) -> None:
    code, out, _ = await run_cli("list", served.url)
    (frame,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and frame["type"] == "resources"
    assert {"kitchen/temperature", "led"} <= {e["name"] for e in frame["resources"]}


async def test_request_subcommand_exit_codes(sensors: SimulatedSensors, served: Served) -> None:
    code, out, _ = await run_cli("request", served.url, "PUT", "led", "--value", '{"on": true}')
    assert code == 0 and json.loads(out)["code"] == "2.04"
    assert sensors.led_on is True

    code, out, _ = await run_cli("request", served.url, "GET", f"{sensors.base_uri}/missing")
    assert code == 1 and json.loads(out)["code"] == "4.04"

    code, out, _ = await run_cli("request", served.url, "GET", "no-such-name")
    assert code == 1 and json.loads(out)["error"] == "not_found"

    code, _, err = await run_cli("request", served.url, "GET", "led", "--value", "{nope")
    assert code == 2 and "--value" in err


async def test_sigterm_cancels_observations_and_exits_0(
    sensors: SimulatedSensors, served: Served
) -> None:
    await sensors.wait_observers("/temperature", 1)  # observe = true: watched from startup
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await served.terminate() == 0
    assert loop.time() - started < 5
    await sensors.wait_observers("/temperature", 0)


async def test_unreachable_gateway_is_exit_2(closed_tcp_port: int) -> None:
    code, _, err = await run_cli("request", f"ws://127.0.0.1:{closed_tcp_port}/ws", "GET", "x")
    assert code == 2 and "cannot reach" in err


@pytest.fixture
def closed_tcp_port() -> int:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nprot = 1\n", "server.prot"),
        ('[[sensors]]\nname = "a"\nuri = "http://x/y"\n', "sensors[0].uri"),
        ("[server\n", "TOML"),
        ('[coap]\nlisten = ["127.0.0.1:0"]\n', "rd.allow_from"),  # an RD open to anyone
    ],
)
def test_invalid_config_is_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert key.lower() in err.lower() and "Traceback" not in err


def test_invalid_flags_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--sensor", "nameless"]) == 2
    assert "--sensor" in capsys.readouterr().err
    assert main(["serve", "--allow", ""]) == 2
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "eighty"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["frobnicate"])
    assert exited.value.code == 2


def test_parser_knows_every_subcommand() -> None:
    parser = build_parser()
    for argv in (
        ["serve"], ["demo"], ["sensors"], ["subscribe", "ws://h/ws", "a", "b", "--count", "2"],
        ["request", "ws://h/ws", "PUT", "led", "--value", "1", "--cf", "50"],
    ):
        assert parser.parse_args(argv).command == argv[0]


async def test_demo_runs_sensors_and_gateway(make_client: Any) -> None:
    demo = await start_process("demo", "--port", "0")
    try:
        assert any(line.startswith("simulated sensors on coap://") for line in demo.lines)
        client = await make_client(demo.url)
        sub = (await client.subscribe(name="demo/temperature"))["sub"]
        frame = await client.next_notify(sub)
        assert isinstance(frame["value"], float)
        reply = await client.call(
            {"type": "request", "method": "PUT", "name": "demo/led", "value": {"on": True}}
        )
        assert reply["code"] == "2.04"
        await client.close()
    finally:
        assert await demo.terminate() == 0
    assert demo.process.stdout is not None
    rest = (await demo.process.stdout.read()).decode()
    assert "Traceback" not in rest


async def test_sensors_subcommand(make_client: Any) -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI, "sensors", "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("simulated sensors on coap://127.0.0.1:")
        assert not line.strip().endswith(":0")
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            assert await process.wait() == 0


def test_example_config_loads() -> None:
    from translator.config import load_config

    config = load_config(Path(__file__).parent.parent / "examples" / "gateway.toml")
    assert [s.name for s in config.sensors] == ["kitchen/temperature", "kitchen/humidity",
                                                "hall/led"]
    assert config.sensors[0].observe is True


def test_every_toml_example_in_the_readme_is_a_valid_configuration() -> None:
    import re
    import tomllib

    from translator.config import config_from_mapping

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(examples) >= 3
    for example in examples:
        data = tomllib.loads(example)
        # Examples name files that exist only on a real deployment.
        data.get("auth", {}).pop("token_file", None)
        if "credentials" in data:
            data["credentials"] = [e for e in data["credentials"] if "oscore_context" not in e]
        config_from_mapping(data)


async def test_sigterm_with_a_stalled_client_and_a_silent_sensor_exits_0_within_budget(
    sensors: SimulatedSensors, tmp_path: Path
) -> None:
    import socket

    import aiocoap

    from .conftest import handshake_request

    # A sensor that takes registrations and never answers anything.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    silent_uri = f"coap://127.0.0.1:{silent.getsockname()[1]}/quiet"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n'
        f'[[sensors]]\nname = "quiet"\nuri = "{silent_uri}"\nobserve = true\n'
        f'[[sensors]]\nname = "temperature"\nuri = "{sensors.base_uri}/temperature"\n'
        f"observe = true\n"
    )
    served = await start_process("serve", "--config", str(config), "--log-level", "warning")
    stalled = socket.socket()
    try:
        await sensors.wait_observers("/temperature", 1)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):  # its discovery may come first
            while (registration := aiocoap.Message.decode(
                await loop.sock_recv(silent, 2048)
            )).opt.observe != 0:
                pass
        # A client that completes its handshake, then never reads again.
        port = int(served.url.rsplit(":", 1)[1].split("/")[0])
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stalled.setblocking(False)
        await loop.sock_connect(stalled, ("127.0.0.1", port))
        await loop.sock_sendall(stalled, handshake_request(port))
        assert b" 101 " in await loop.sock_recv(stalled, 4096)
        assert await served.terminate() == 0
        assert served.process.stderr is not None
        err = (await served.process.stderr.read()).decode()
        assert "shutdown took longer" not in err and "Traceback" not in err, err
        # Both sensors were told: the deregistrations went out although one never answers.
        await sensors.wait_observers("/temperature", 0)
        datagrams = []
        with contextlib.suppress(BlockingIOError):
            while True:
                datagrams.append(aiocoap.Message.decode(silent.recv(2048)))
        assert any(
            m.opt.observe == 1 and m.token == registration.token for m in datagrams
        ), datagrams
    finally:
        stalled.close()
        silent.close()
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()


async def test_serve_logs_json_lines_with_the_connection_as_fields(
    sensors: SimulatedSensors, make_client: Any
) -> None:
    served = await start_process("serve", "--port", "0", "--sensor",
                                 f"t={sensors.base_uri}/temperature", "--log-format", "json",
                                 "--log-level", "info")
    try:
        client = await make_client(served.url)
        await client.subscribe(name="t")
        await client.close()
    finally:
        assert await served.terminate() == 0
    assert served.process.stderr is not None
    lines = [json.loads(line) for line in (await served.process.stderr.read()).splitlines()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    connected = [line for line in lines if line["message"].endswith(" connected")]
    assert connected and isinstance(connected[0]["conn"], int) and connected[0]["remote"]


async def test_subscribe_cond_is_sent_with_every_target(
    sensors: SimulatedSensors, served: Served
) -> None:
    # The sensor changes every 50 ms by far less than 1000: only the current value comes.
    code, out, err = await run_cli("subscribe", served.url, "kitchen/temperature",
                                   "--cond", "st=1000,pmin=0.2", "--count", "2",
                                   "--timeout", "1.5")
    notifies = [f for f in map(json.loads, out.splitlines()) if f["type"] == "notify"]
    assert code == 1 and len(notifies) == 1 and "fewer than 2" in err


def test_cond_option_forms_and_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    parse = build_parser().parse_args
    args = parse(["subscribe", "ws://h/ws", "t", "--cond", "pmin=1,st=0.5,path=/0/v,band,gt=3"])
    assert args.cond == {"pmin": 1, "st": 0.5, "path": "/0/v", "band": True, "gt": 3}
    args = parse(["subscribe", "ws://h/ws", "t", "--cond", '{"edge": false}'])
    assert args.cond == {"edge": False}
    for bad, named in (("pmin=0", "'pmin'"), ("st=x", "st needs a number"),
                       ("edge=maybe", "edge is true or false"), ("nope=1", "'nope'"),
                       ("band", "'band'"), ("path=v", "'path'")):
        with pytest.raises(SystemExit) as exited:
            parse(["subscribe", "ws://h/ws", "t", "--cond", bad])
        assert exited.value.code == 2
        assert named in capsys.readouterr().err, bad
