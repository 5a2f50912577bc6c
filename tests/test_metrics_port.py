"""`[metrics] listen` / `--metrics-listen`: the operator's endpoints on an address of their
own, with the same token rules as the WebSocket port (issue 14 §5)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from translator.config import ConfigError, apply_overrides, config_from_mapping
from translator.gateway import Gateway
from translator.sim import SimulatedSensors
from translator.web import metrics_port

from .conftest import WAIT, gateway_config
from .test_cli import run_cli
from .test_operations import METRICS_TOKEN, READER_TOKEN, value
from .test_web_surface import exchange, head


def with_metrics_port(sensors: SimulatedSensors, tokens: bool) -> dict[str, Any]:
    config = gateway_config(sensors)
    config["metrics"] = {"listen": "127.0.0.1:0"}
    if tokens:
        config["auth"] = {"tokens": [
            {"token": METRICS_TOKEN, "name": "scraper", "scopes": ["metrics"]},
            {"token": READER_TOKEN, "name": "reader", "scopes": ["read"]},
        ]}
    return config


def metrics_port_of(gateway: Gateway) -> int:
    assert gateway.metrics_port is not None
    port = gateway.metrics_port.port
    assert port not in (0, gateway.ws.port)
    return port


async def test_metrics_port_asks_for_a_token_with_the_metrics_scope(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(with_metrics_port(sensors, tokens=True))
    port = metrics_port_of(gateway)
    client = await make_client(f"{gateway.url}?access_token={READER_TOKEN}")
    await client.subscribe(name="temperature")
    await client.next_notify()

    answer = await exchange(port, head("GET", "/metrics"))
    assert answer.status == 401 and answer.headers["www-authenticate"][0].startswith("Bearer")
    answer = await exchange(port, head("GET", "/metrics", "Authorization: Bearer wrong-token"))
    assert answer.status == 401
    answer = await exchange(port, head("GET", "/metrics", f"Authorization: Bearer {READER_TOKEN}"))
    assert answer.status == 403 and b"metrics" in answer.body
    answer = await exchange(
        port, head("GET", "/metrics", f"Authorization: Bearer {METRICS_TOKEN}")
    )
    assert answer.status == 200
    assert answer.headers["content-type"][0].startswith("text/plain; version=0.0.4")
    # The same gateway's figures as on the WebSocket port.
    body = answer.body.decode()
    assert value(body, "coap_ws_gateway_connections") == 1
    assert value(body, "coap_ws_gateway_subscriptions") == 1


async def test_metrics_port_serves_the_operator_endpoints_and_nothing_else(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(with_metrics_port(sensors, tokens=False))
    port = metrics_port_of(gateway)
    answer = await exchange(port, head("GET", "/metrics"))
    assert answer.status == 200 and b"coap_ws_gateway_connections" in answer.body
    for path in ("/", "/ws", "/client.js", "/metrics/x", "/nope?x=1"):
        assert (await exchange(port, head("GET", path))).status == 404, path
    assert (await exchange(port, head("GET", "/healthz"))).status == 200
    assert (await exchange(port, head("GET", "/readyz"))).status == 200
    answer = await exchange(port, head("HEAD", "/metrics"), head_only=True)
    assert answer.status == 200 and int(answer.headers["content-length"][0]) > 0
    assert (await exchange(port, head("POST", "/metrics"))).status == 405
    # A head the port cannot read, and a name it does not serve (DNS rebinding).
    assert (await exchange(port, b"GET /metrics HTTP/1.1\nHost: x\n\n")).status == 400
    rebound = b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    assert (await exchange(port, rebound)).status == 421


async def test_metrics_port_drops_a_connection_that_sends_nothing_and_stops_with_the_gateway(
    sensors: SimulatedSensors, make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_port, "CONNECTION_TIMEOUT", 0.5)
    gateway: Gateway = await make_gateway(with_metrics_port(sensors, tokens=False))
    port = metrics_port_of(gateway)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(WAIT):
        assert await reader.read() == b""  # closed by the port, unanswered
    writer.close()
    await gateway.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize(
    ("listen", "said"),
    [
        ("127.0.0.1", "HOST:PORT"),
        ("::1:9464", "brackets"),
        ("127.0.0.1:65536", "0..65535"),
        ("[zz]:1", "not an IPv6 address"),
        ("bad_name:1", "bad_name"),
        ("", "non-empty"),
    ],
)
def test_a_malformed_listen_address_names_the_key(listen: str, said: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_mapping({"metrics": {"listen": listen}})
    assert raised.value.key == "metrics.listen" and said in raised.value.message
    with pytest.raises(ConfigError) as raised:
        apply_overrides(config_from_mapping({}), metrics_listen=listen)
    assert raised.value.key == "--metrics-listen"


def test_listen_addresses_in_every_form() -> None:
    for listen, address in (
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:9464", ("localhost", 9464)),
    ):
        assert config_from_mapping({"metrics": {"listen": listen}}).metrics.address == address
    assert config_from_mapping({}).metrics.address is None


async def test_cli_metrics_listen_that_cannot_be_bound_is_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        code, _, err = await run_cli("serve", "--port", "0", "--metrics-listen",
                                     f"127.0.0.1:{busy}")
    assert code == 2, err
    assert f"metrics.listen': cannot listen on 127.0.0.1:{busy}" in err
    assert "Traceback" not in err
    code, _, err = await run_cli("serve", "--port", "0", "--metrics-listen", "nowhere")
    assert code == 2 and "--metrics-listen" in err and "HOST:PORT" in err, err
