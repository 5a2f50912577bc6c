"""The handshake's defences, end to end: Origin checks and TLS."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from translator.cli import main
from translator.sim import SimulatedSensors

from .conftest import WAIT, Client, gateway_config
from .test_cli import start_process


async def test_foreign_origin_gets_403_own_and_missing_origin_are_allowed(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors))
    host = f"127.0.0.1:{gateway.ws.port}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.url, origin="http://evil.example", open_timeout=WAIT)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    for origin in (f"http://{host}", f"https://{host}", None):
        ws = await connect(gateway.url, origin=origin, open_timeout=WAIT)  # type: ignore[arg-type]
        await ws.close()


async def test_allowed_origins_setting(sensors: SimulatedSensors, make_gateway: Any) -> None:
    config = gateway_config(sensors, allowed_origins=["https://app.example"])
    gateway = await make_gateway(config)
    ws = await connect(gateway.url, origin="https://app.example", open_timeout=WAIT)  # type: ignore[arg-type]
    await ws.close()
    # The gateway's own origin stays allowed (its page keeps working); others do not.
    own = f"http://127.0.0.1:{gateway.ws.port}"
    ws = await connect(gateway.url, origin=own, open_timeout=WAIT)  # type: ignore[arg-type]
    await ws.close()
    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.url, origin="https://other.example", open_timeout=WAIT)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.CA]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file, ca


async def test_wss_with_a_self_signed_certificate(
    sensors: SimulatedSensors,
    certificate: tuple[Path, Path, trustme.CA],
    tmp_path: Path,
) -> None:
    cert_file, key_file, ca = certificate
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = 0\n[[sensors]]\nname = "t"\nuri = "{sensors.base_uri}/temperature"\n'
    )
    served = await start_process(
        "serve", "--config", str(config), "--tls-cert", str(cert_file), "--tls-key",
        str(key_file),
    )
    try:
        assert served.url.startswith("wss://127.0.0.1:")
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        ws = await connect(served.url, ssl=client_context, open_timeout=WAIT)
        client = Client(ws)
        sub = (await client.subscribe(name="t"))["sub"]
        assert (await client.next_notify(sub))["cf"] == 60
        await client.close()
        # A client that does not trust the certificate cannot connect.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(served.url, ssl=ssl.create_default_context(), open_timeout=WAIT)
    finally:
        assert await served.terminate() == 0


def test_tls_flags_errors_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--port", "0", "--tls-cert", str(tmp_path / "missing.pem")]) == 2
    assert "tls" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pem")
    assert main(["serve", "--port", "0", "--tls-cert", missing, "--tls-key", missing]) == 2
    assert "missing.pem" in capsys.readouterr().err


# -- authentication and authorization ---------------------------------------------------------

SECRET = "s3cret-token-value"
READER = "reader-token-value"
NARROW = "narrow-token-value"


def auth_config(sensors: SimulatedSensors, **limits: Any) -> dict[str, Any]:
    config = gateway_config(sensors)
    config["auth"] = {
        "tokens": [
            {"token": SECRET, "name": "admin", "scopes": ["read", "write"]},
            {"token": READER, "name": "reader", "scopes": ["read"]},
            {"token": NARROW, "name": "led-only", "scopes": ["read", "write"],
             "allow": ["led"]},
        ]
    }
    if limits:
        config["limits"] = limits
    return config


async def open_client(url: str, token: str | None = None, query: bool = False) -> Client:
    headers = {}
    if token is not None and not query:
        headers["Authorization"] = f"Bearer {token}"
    if token is not None and query:
        url = f"{url}?access_token={token}"
    ws = await connect(url, additional_headers=headers, open_timeout=WAIT)
    return Client(ws)


async def test_missing_or_wrong_token_gets_401(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway = await make_gateway(auth_config(sensors))
    for token in (None, "wrong", SECRET + "x"):
        with pytest.raises(InvalidStatus) as refused:
            await open_client(gateway.url, token)
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    for query in (False, True):
        client = await open_client(gateway.url, SECRET, query=query)
        assert (await client.call({"type": "ping"}))["type"] == "pong"
        await client.close()


async def test_scopes_and_per_token_allow(sensors: SimulatedSensors, make_gateway: Any) -> None:
    gateway = await make_gateway(auth_config(sensors))
    reader = await open_client(gateway.url, READER)
    await reader.subscribe(name="temperature")
    assert (await reader.call({"type": "request", "method": "GET", "name": "led"}))["code"]
    put = {"type": "request", "method": "PUT", "name": "led", "value": {"on": True}}
    denied = await reader.call(put)
    assert denied["type"] == "error" and denied["error"] == "forbidden"
    assert sensors.led_on is False

    narrow = await open_client(gateway.url, NARROW)
    assert (await narrow.call(put))["code"] == "2.04"
    denied = await narrow.call({"type": "subscribe", "name": "temperature"})
    assert denied["error"] == "not_found"  # as for a name that does not exist
    listed = await narrow.call({"type": "list"})
    assert [e["name"] for e in listed["resources"]] == ["led"]
    for client in (reader, narrow):
        await client.close()


async def test_tokens_never_appear_in_logs(
    sensors: SimulatedSensors, make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await make_gateway(auth_config(sensors))
    client = await open_client(gateway.url, SECRET, query=True)
    await client.subscribe(name="temperature")
    await client.close()
    with pytest.raises(InvalidStatus):
        await open_client(gateway.url, "wrong-" + SECRET, query=True)
    # The gateway's records (not the test client's own websockets.client ones).
    records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert any("GET /ws?<redacted>" in r.getMessage() for r in records)
    for token in (SECRET, READER, NARROW):
        assert all(token not in record.getMessage() for record in records)
    assert any("admin" in record.getMessage() for record in caplog.records)


def test_no_tokens_off_loopback_refuses_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--no-auth" in err and "Traceback" not in err


async def test_environment_token_grants_read_and_write(
    sensors: SimulatedSensors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = 0\n[[sensors]]\nname = "led"\nuri = "{sensors.base_uri}/led"\n'
    )
    monkeypatch.setenv("COAP_WS_GATEWAY_TOKEN", SECRET)
    served = await start_process("serve", "--config", str(config))
    try:
        with pytest.raises(InvalidStatus):
            await open_client(served.url)
        client = await open_client(served.url, SECRET)
        reply = await client.call(
            {"type": "request", "method": "PUT", "name": "led", "value": {"on": True}}
        )
        assert reply["code"] == "2.04"
        await client.close()
    finally:
        assert await served.terminate() == 0


async def test_request_rate_limit(sensors: SimulatedSensors, make_gateway: Any) -> None:
    gateway = await make_gateway({**gateway_config(sensors), "limits": {"rate": 0.5, "burst": 2}})
    client = await open_client(gateway.url)
    get = {"type": "request", "method": "GET", "name": "status"}
    assert (await client.call(get))["type"] == "response"
    assert (await client.call(get))["type"] == "response"
    limited = await client.call(get)
    assert limited["type"] == "error" and limited["error"] == "rate_limited"
    # Every frame type draws on the same bucket, each by its cost.
    limited = await client.call({"type": "ping"})
    assert limited["type"] == "error" and limited["error"] == "rate_limited"
    await client.close()


async def test_every_frame_type_is_rate_limited_by_its_cost(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    from translator.core import frames
    from translator.gateway import FRAME_COSTS

    gateway = await make_gateway({**gateway_config(sensors),
                                  "limits": {"rate": 0.001, "burst": 1}})
    client = await open_client(gateway.url)
    pings = round(1 / FRAME_COSTS[frames.Ping])
    for _ in range(pings):
        assert (await client.call({"type": "ping"}))["type"] == "pong"
    for frame in ({"type": "ping"}, {"type": "list"}, {"type": "subscribe", "name": "led"},
                  {"type": "unsubscribe", "sub": "s1"}, "not json at all"):
        if isinstance(frame, str):
            await client.send(frame)
            reply = await client.recv()
        else:
            reply = await client.call(frame)
        assert reply["type"] == "error" and reply["error"] == "rate_limited", (frame, reply)
    await client.close()

    # A cost above the bucket takes the whole bucket: a list still goes through once.
    client = await open_client(gateway.url)
    assert (await client.call({"type": "list"}))["type"] == "resources"
    assert (await client.call({"type": "ping"}))["error"] == "rate_limited"
    await client.close()


async def test_connections_per_ip_limit_gives_503(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    config = {**gateway_config(sensors), "limits": {"max_connections_per_ip": 2}}
    gateway = await make_gateway(config)
    first, second = await open_client(gateway.url), await open_client(gateway.url)
    with pytest.raises(InvalidStatus) as refused:
        await open_client(gateway.url)
    assert refused.value.response.status_code == 503
    await first.close()
    # A closed connection frees its place.
    third = None
    async with asyncio.timeout(WAIT):
        while third is None:
            try:
                third = await open_client(gateway.url)
            except InvalidStatus:
                await asyncio.sleep(0.05)  # the server has not seen the close yet
    for client in (second, third):
        await client.close()


async def test_silent_handshake_is_dropped(sensors: SimulatedSensors, make_gateway: Any) -> None:
    config = {**gateway_config(sensors), "limits": {"handshake_timeout": 0.3}}
    gateway = await make_gateway(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.ws.port)
    async with asyncio.timeout(WAIT):
        data = await reader.read()  # returns at EOF: the gateway hung up
    assert b"101" not in data
    writer.close()


async def test_requests_never_carry_proxy_options(make_gateway: Any, make_client: Any) -> None:
    import aiocoap
    from aiocoap import resource

    seen: list[Any] = []

    class Recorder(resource.Resource):  # type: ignore[misc]
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            seen.append(request.opt)
            return aiocoap.Message(payload=b"ok", content_format=0)

    site = resource.Site()
    site.add_resource(["r"], Recorder())
    server = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        from translator.sim import _bound_port

        base = f"coap://127.0.0.1:{_bound_port(server)}"
        gateway = await make_gateway({"server": {"port": 0}, "policy": {"allow": [f"{base}/*"]}})
        client = await make_client(gateway.url)
        reply = await client.call({
            "type": "request", "method": "GET", "uri": f"{base}/r",
            "proxy_uri": "coap://10.0.0.1/x", "Proxy-Uri": "coap://10.0.0.1/x",
        })
        assert reply["value"] == "ok"
        assert seen and all(o.proxy_uri is None and o.proxy_scheme is None for o in seen)
    finally:
        await server.shutdown()


async def test_cli_clients_take_a_token_and_never_print_it(
    sensors: SimulatedSensors, make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_cli import run_cli

    gateway = await make_gateway(auth_config(sensors))
    monkeypatch.delenv("COAP_WS_GATEWAY_TOKEN", raising=False)
    code, out, err = await run_cli("list", gateway.url)
    assert code == 2 and "this gateway needs a token" in err and "--token" in err
    code, out, err = await run_cli("list", gateway.url, "--token", "wrong-" + SECRET)
    assert code == 2 and "refused the token" in err and SECRET not in out + err
    code, out, err = await run_cli("request", gateway.url, "GET", "led", "--token", SECRET)
    assert code == 0 and json.loads(out)["type"] == "response"
    assert SECRET not in out + err
    monkeypatch.setenv("COAP_WS_GATEWAY_TOKEN", READER)
    code, out, err = await run_cli("subscribe", gateway.url, "temperature", "--count", "1")
    assert code == 0 and json.loads(out.splitlines()[-1])["type"] == "notify"
    code, out, err = await run_cli("request", gateway.url, "PUT", "led", "--value", "1")
    assert code == 1 and json.loads(out)["error"] == "forbidden"
    assert READER not in out + err


# -- DNS rebinding, wrong paths (issue 13 §2, §10) --------------------------------------------


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            # Every answer but a 101 closes the connection after its body.
            return status, head + (b"" if status == 101 else await reader.read())
    finally:
        writer.close()


def upgrade(port: int, host: str, path: str = "/ws", origin: str | None = None) -> bytes:
    from .conftest import handshake_request

    request = handshake_request(port, path).replace(
        f"Host: 127.0.0.1:{port}".encode(), f"Host: {host}".encode()
    )
    if origin is not None:
        request = request.replace(b"\r\n\r\n", f"\r\nOrigin: {origin}\r\n\r\n".encode())
    return request


async def test_a_rebound_host_name_gets_421_before_the_upgrade_and_the_page(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors, server_names=["gateway.example"]))
    port = gateway.ws.port
    evil = f"evil.example:{port}"
    status, answer = await raw_exchange(port, upgrade(port, evil, origin=f"http://{evil}"))
    assert status == 421 and b"server_names" in answer
    status, _ = await raw_exchange(port, f"GET / HTTP/1.1\r\nHost: {evil}\r\n\r\n".encode())
    assert status == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                 f"gateway.example:{port}", "GATEWAY.example."):
        status, _ = await raw_exchange(port, upgrade(port, host, origin=f"http://{host}"))
        assert status == 101, host
        status, _ = await raw_exchange(port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status == 200, host


async def test_an_upgrade_on_a_wrong_path_gets_404_naming_the_endpoint(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors))
    port = gateway.ws.port
    for path in ("/", "/index.html", "/websocket"):
        status, answer = await raw_exchange(port, upgrade(port, f"127.0.0.1:{port}", path))
        assert status == 404 and b"it is at /ws" in answer, (path, answer)
    from .test_cli import run_cli

    code, _, err = await run_cli("list", f"ws://127.0.0.1:{port}/")
    assert code == 2 and "HTTP 404" in err
