"""Sensors that break the rules of block-wise transfers (RFC 7959), end to end (issue 13 §1).

A real aiocoap server serves an observable resource block by block, breaking one rule each:
a block with more to follow shorter than the block size (the sensor that made the gateway
ask for the same block 53 000 times in half a second), a block number that skips, a block
size that grows, a representation without end, and blocks that trickle in past
``[supervision] transfer_timeout``. Through a real gateway, a request for it must end with
``upstream_error`` naming the rule, a subscription with a ``notify`` whose ``decode_error``
says it, and the sensor must see only the few block requests that took to find out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
import pytest_asyncio
from aiocoap import resource

from translator.sim import _bound_port

from .conftest import Client

LIMIT = 4096


class Misbehaving(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """Serves its blocks itself (as constrained sensors do), breaking the rule `mode` names
    from block 1 on. Block 0 is always 1024 bytes with more to follow."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.block_requests = 0
        """Requests for a block after block 0."""

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> aiocoap.Message:
        asked = request.opt.block2
        number = 0 if asked is None else asked.block_number
        exponent, payload = 6, b"x" * 1024
        if number > 0:
            self.block_requests += 1
            if self.mode == "short":
                payload = b"x" * 10
            elif self.mode == "empty":
                payload = b""
            elif self.mode == "skip":
                number += 2
            elif self.mode == "slow":
                await asyncio.sleep(0.3)  # the sensor's pace, not a wait for a condition
        elif self.mode == "grow":
            exponent, payload = 5, b"x" * 512
        if self.mode == "grow" and number > 0:
            number, exponent = 1, 6  # block 1 of 1024 bytes, asked for 512
        return aiocoap.Message(
            code=aiocoap.CONTENT, payload=payload, content_format=0, etag=b"1",
            block2=(number, True, exponent), transport_tuning=aiocoap.Unreliable(),
        )


MODES = {
    # mode: (what upstream_error and decode_error say, block requests at most)
    "short": ("block 1 has 10 bytes and more to follow, not the block size 1024", 1),
    "empty": ("block 1 has 0 bytes and more to follow, not the block size 1024", 1),
    "skip": ("block 3 of 1024 bytes is not the one asked for (block 1", 1),
    "grow": ("larger than the 512 asked for (RFC 7959 §2.4: the size may only shrink)", 1),
    "endless": ("representation larger than max_upstream_bytes (4096 bytes)", 4),
}


@pytest_asyncio.fixture
async def sensor() -> AsyncIterator[tuple[int, dict[str, Misbehaving]]]:
    resources = {mode: Misbehaving(mode) for mode in [*MODES, "slow"]}
    site = resource.Site()
    for mode, res in resources.items():
        site.add_resource([mode], res)
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        yield _bound_port(context), resources
    finally:
        await context.shutdown()


@pytest_asyncio.fixture
async def client(
    sensor: tuple[int, dict[str, Misbehaving]], make_gateway: Any, make_client: Any
) -> Client:
    port, _ = sensor
    gateway = await make_gateway({
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "policy": {"allow": [f"coap://127.0.0.1:{port}/*"]},
        "limits": {"max_upstream_bytes": LIMIT},
        "supervision": {"backoff_min": 0.05, "backoff_max": 0.3, "registration_timeout": 2,
                        "transfer_timeout": 1},
    })
    c: Client = await make_client(gateway.url)
    return c


@pytest.mark.parametrize("mode", list(MODES))
async def test_a_request_ends_with_upstream_error_naming_the_rule(
    sensor: tuple[int, dict[str, Misbehaving]], client: Client, mode: str
) -> None:
    port, resources = sensor
    says, most = MODES[mode]
    reply = await client.call({"type": "request", "method": "GET",
                               "uri": f"coap://127.0.0.1:{port}/{mode}", "timeout": 5})
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert says in reply["message"]
    assert resources[mode].block_requests <= most


@pytest.mark.parametrize("mode", [*MODES, "slow"])
async def test_a_subscription_gets_a_notify_with_decode_error(
    sensor: tuple[int, dict[str, Misbehaving]], client: Client, mode: str
) -> None:
    port, resources = sensor
    says, most = MODES.get(mode, ("not complete within transfer_timeout (1 s)", 4))
    sub = (await client.subscribe(uri=f"coap://127.0.0.1:{port}/{mode}"))["sub"]
    notify = await client.next_notify(sub)
    assert says in notify["decode_error"], notify
    assert "value" not in notify and "payload_b64" not in notify
    assert notify["code"] == "2.05"
    assert resources[mode].block_requests <= most
    # The observation goes on: the sensor is not asked for its blocks again and again.
    await client.call({"type": "ping"})
    assert resources[mode].block_requests <= most
