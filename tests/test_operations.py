"""The operator's endpoints (issue 14 §5): /healthz, /readyz and /metrics on the WebSocket
port, against a real gateway, with and without tokens."""

from __future__ import annotations

import asyncio
import http
from typing import Any

from translator.gateway import Gateway
from translator.sim import SimulatedSensors
from translator.web.front import Answer, answer_request, parse_head, text_answer

from .conftest import gateway_config
from .test_web_surface import exchange, head

METRICS_TOKEN = "metrics-token-value"
READER_TOKEN = "reader-token-value1"


async def get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], str]:
    """GET `path` on a fresh connection (test_web_surface's `exchange`): the status, the
    headers by lower-case name, the body as text."""
    answer = await exchange(port, head("GET", path, *headers))
    fields = {name: ", ".join(values) for name, values in answer.headers.items()}
    return answer.status, fields, answer.body.decode()


def value(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics")


async def test_health_and_readiness(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_config(sensors))
    port = gateway.ws.port
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/readyz"))[0] == 200
    assert (await get(port, "/readyz", "Upgrade: websocket"))[0] == 404  # not an endpoint
    stopping = asyncio.create_task(gateway.stop())
    await asyncio.sleep(0)  # let the stop begin (it refuses new work at once)
    assert not gateway.ready()
    await stopping


class Operations:
    """What the endpoints ask the gateway, as plain answers."""

    def __init__(self, ready: bool) -> None:
        self.is_ready = ready

    def ready(self) -> bool:
        return self.is_ready

    def degraded(self) -> str | None:
        return None

    def metrics(self, authorization: str | None) -> Answer:
        return text_answer(http.HTTPStatus.OK, f"metrics for {authorization}")


def test_readyz_says_503_while_not_ready_and_healthz_always_200() -> None:
    def status(path: str, operations: Any) -> int:
        answer = answer_request(parse_head(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()), None, operations)
        assert answer is not None
        return answer.status

    assert status("/readyz", Operations(ready=False)) == 503
    assert status("/readyz", Operations(ready=True)) == 200
    assert status("/healthz", Operations(ready=False)) == 200
    assert status("/metrics", None) == 404


async def test_metrics_reflect_what_happens(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_config(sensors))
    port = gateway.ws.port
    status, fields, body = await get(port, "/metrics")
    assert status == 200 and fields["content-type"].startswith("text/plain; version=0.0.4")
    assert value(body, "coap_ws_gateway_connections") == 0
    client = await make_client(gateway.url)
    await client.subscribe(name="temperature")
    await client.next_notify()
    reply = await client.call({"type": "request", "method": "GET", "name": "status"})
    assert reply["code"] == "2.05"
    _, _, body = await get(port, "/metrics")
    assert value(body, "coap_ws_gateway_connections") == 1
    assert value(body, "coap_ws_gateway_subscriptions") == 1
    assert value(body, "coap_ws_gateway_deliveries_total") >= 1
    assert value(body, "coap_ws_gateway_registrations_total") >= 1
    assert 'coap_ws_gateway_requests_total{method="GET",outcome="2.xx"} 1.0' in body
    assert 'coap_ws_gateway_resources{state="online"} 1.0' in body
    assert "coap_ws_gateway_request_seconds_bucket" in body


async def test_metrics_need_a_token_with_the_metrics_scope_when_tokens_exist(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    config = gateway_config(sensors)
    config["auth"] = {"tokens": [
        {"token": METRICS_TOKEN, "name": "scraper", "scopes": ["metrics"]},
        {"token": READER_TOKEN, "name": "reader", "scopes": ["read"]},
    ]}
    gateway: Gateway = await make_gateway(config)
    port = gateway.ws.port
    status, fields, _ = await get(port, "/metrics")
    assert status == 401 and fields["www-authenticate"].startswith("Bearer")
    assert (await get(port, "/metrics", "Authorization: Bearer wrong-token-value"))[0] == 401
    status, _, body = await get(port, "/metrics", f"Authorization: Bearer {READER_TOKEN}")
    assert status == 403 and "metrics" in body
    status, _, body = await get(port, "/metrics", f"Authorization: Bearer {METRICS_TOKEN}")
    assert status == 200 and "coap_ws_gateway_connections" in body
    # Health and readiness reveal nothing: no token needed.
    assert (await get(port, "/healthz"))[0] == (await get(port, "/readyz"))[0] == 200
