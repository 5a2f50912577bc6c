"""A coap-ws-gateway client that speaks CBOR (docs/protocol.md §18), in 60 lines.

    python examples/cbor_client.py ws://127.0.0.1:8765/ws demo/temperature [--count N]

It opens the WebSocket with the `coap-ws-gateway.v1.cbor` subprotocol (and offers
permessage-deflate, which a gateway with `[server] compression = "deflate"` accepts), sends a
compact `subscribe` as a CBOR map, and prints each update. Compact notifies carry only what
changed, so it keeps each subscription's last complete fields and merges every frame into
them. Values the sensor sent as CBOR arrive as the sensor's own data item: a bignum is a
Python int, a tag a `cbor2.CBORTag`, a byte string `bytes`.

Needs only what the gateway itself installs: websockets and cbor2.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import cbor2
from websockets.asyncio.client import connect

SUBPROTOCOL = "coap-ws-gateway.v1.cbor"


async def follow(url: str, target: str, count: int | None) -> None:
    async with connect(url, subprotocols=[SUBPROTOCOL], compression="deflate") as ws:
        if ws.subprotocol != SUBPROTOCOL:
            raise SystemExit(f"the gateway at {url} did not agree to {SUBPROTOCOL}")
        where = {"uri": target} if "://" in target else {"name": target}
        await ws.send(cbor2.dumps({"type": "subscribe", "id": 1, "compact": True, **where}))
        state: dict[str, dict[str, Any]] = {}  # sub -> the fields of its last notify
        seen = 0
        while count is None or seen < count:
            message = await ws.recv()
            assert isinstance(message, bytes)  # a CBOR connection's frames are binary
            frame = cbor2.loads(message)
            if frame["type"] == "notify":
                sub = frame["sub"]
                current = state.setdefault(sub, {})
                for field in ("value", "payload_b64", "decode_error"):
                    current.pop(field, None)  # the payload fields are always sent afresh
                current.update(frame)
                seen += 1
                print(f"{current['uri']} #{current['seq']} (cf {current['cf']}, "
                      f"{len(message)} bytes): {current.get('value')!r}", flush=True)
            elif frame["type"] == "error":
                raise SystemExit(f"error: {frame['error']}: {frame['message']}")
            else:
                print(frame, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("target", help="a configured sensor name or a coap:// URI")
    parser.add_argument("--count", type=int, help="stop after N updates")
    args = parser.parse_args()
    asyncio.run(follow(args.url, args.target, args.count))


if __name__ == "__main__":
    main()
