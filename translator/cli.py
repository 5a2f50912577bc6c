"""The `coap-ws-gateway` command line: serve, demo, sensors, subscribe, request, list.

`main(argv)` returns the process exit code: 0 on success, 1 when a `request` got a non-2.xx
answer or an error frame (or every target of a `subscribe` failed), 2 for a usage or
configuration error, an unreachable gateway or a refused token. Long-running subcommands
stop cleanly on SIGINT/SIGTERM.

The client subcommands print every frame the gateway sends about what was asked (notify,
status, response, error, resources) on stdout, one JSON object per line, and their own
messages on stderr. A token comes from ``--token`` or the ``COAP_WS_GATEWAY_TOKEN``
environment variable and travels in the ``Authorization`` header, never in the URL, and is
never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from translator.config import (
    ConfigError,
    GatewayConfig,
    apply_overrides,
    config_from_mapping,
    load_config,
)
from translator.core.conditions import ConditionError, parse_condition

TOKEN_ENV = "COAP_WS_GATEWAY_TOKEN"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STOP_BUDGET = 5.0
"""Seconds a shutdown may take after SIGINT/SIGTERM."""


class UsageError(Exception):
    """Bad arguments found after parsing (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-ws-gateway",
        description="CoAP-to-WebSocket gateway: observe CoAP sensors, serve their values "
        "as JSON over WebSocket, and forward commands as CoAP requests.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="WebSocket port (default 8765; 0 = any free)")
    serve.add_argument("--sensor", action="append", default=[], metavar="NAME=URI",
                       help="a named sensor (repeatable)")
    serve.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                       help="allow CoAP URIs matching PATTERN, with * and ? (repeatable)")
    serve.add_argument("--linger", type=float, metavar="SECONDS",
                       help="keep an unwatched observation this long (default 5)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="one readable line per record (default), or one JSON object")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve wss://")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="also serve /metrics on this address ([metrics] listen)")
    serve.add_argument("--no-auth", action="store_true",
                       help="run without authentication even off loopback ([auth] mode = none)")
    serve.add_argument("--nats", action="append", default=[], metavar="URL",
                       help="join a cluster over this NATS server (repeatable; [cluster] nats)")
    serve.add_argument("--node", metavar="NAME",
                       help="this node's name in the cluster (default: host name and pid)")
    serve.add_argument("--nats-credentials", metavar="FILE",
                       help="NATS credentials file, .creds ([cluster] credentials)")
    serve.add_argument("--nats-tls-ca", metavar="FILE",
                       help="PEM CA bundle of the NATS servers ([cluster] tls_ca)")
    serve.add_argument("--nats-tls-cert", metavar="FILE",
                       help="PEM client certificate for NATS ([cluster] tls_cert)")
    serve.add_argument("--nats-tls-key", metavar="FILE",
                       help="PEM private key of --nats-tls-cert ([cluster] tls_key)")

    demo = commands.add_parser("demo", help="run simulated sensors and a gateway for them")
    demo.add_argument("--host", default="127.0.0.1", help="address for both (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8765, help="WebSocket port (default 8765)")
    demo.add_argument("--coap-port", type=int, default=0,
                      help="UDP port of the simulated sensors (default: any free port)")
    demo.add_argument("--rd", action="store_true",
                      help="the sensors register themselves at the gateway's Resource "
                      "Directory (RFC 9176) instead of being configured")
    demo.add_argument("--rd-port", type=int, default=0,
                      help="the directory's CoAP port with --rd (default 0: the OS picks)")
    demo.add_argument("--log-level", default="warning",
                      choices=["debug", "info", "warning", "error"])
    demo.add_argument("--log-format", default="text", choices=["text", "json"])

    sensors = commands.add_parser("sensors", help="run the simulated sensors alone")
    sensors.add_argument("--host", default="127.0.0.1")
    sensors.add_argument("--port", type=int, default=5683)
    sensors.add_argument("--interval", type=float, default=1.0,
                         help="seconds between value changes (default 1)")
    sensors.add_argument("--log-level", default="warning",
                         choices=["debug", "info", "warning", "error"])

    subscribe = commands.add_parser("subscribe", help="print a resource's updates as JSON lines")
    subscribe.add_argument("url", metavar="WS_URL")
    subscribe.add_argument("targets", nargs="+", metavar="URI_OR_NAME")
    subscribe.add_argument("--count", type=int, metavar="N",
                           help="stop after N notify frames in total")
    subscribe.add_argument("--timeout", type=float, metavar="S",
                           help="stop after S seconds (exit 1 if --count was not reached)")
    subscribe.add_argument("--cond", metavar="K=V,...", type=_cond_option,
                           help="conditional notifications for every target, e.g. "
                           "pmin=1,st=0.5,path=/0/v (pmin, pmax, gt, lt, st, band, edge, "
                           "path; or a JSON object)")
    subscribe.add_argument("--compact", action="store_true",
                           help="compact notifies: after the first, only the fields that "
                           "changed besides sub, seq, value and ts (docs/protocol.md §18)")
    _token_option(subscribe)

    listing = commands.add_parser("list", help="print the resources the gateway knows")
    listing.add_argument("url", metavar="WS_URL")
    _token_option(listing)

    request = commands.add_parser("request", help="send one CoAP request through the gateway")
    request.add_argument("url", metavar="WS_URL")
    request.add_argument("method", metavar="METHOD")
    request.add_argument("target", metavar="URI_OR_NAME")
    body = request.add_mutually_exclusive_group()
    body.add_argument("--value", metavar="JSON", help="payload as a JSON value")
    body.add_argument("--payload-file", metavar="FILE", help="raw payload bytes from a file")
    request.add_argument("--cf", type=int, help="content-format of the payload")
    request.add_argument("--accept", type=int, help="Accept option")
    request.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    request.add_argument("--non", action="store_true", help="send as non-confirmable")
    _token_option(request)
    return parser


_COND_NUMBERS: Final = ("pmin", "pmax", "gt", "lt", "st")
_COND_BOOLEANS: Final = {"true": True, "1": True, "false": False, "0": False}


def _cond_option(text: str) -> dict[str, Any]:
    """`--cond`: ``pmin=1,st=0.5,path=/v`` (``band`` alone means band=true) or a JSON
    object; checked here by the gateway's own rules, so a mistake is exit 2, not a frame."""
    cond: dict[str, Any] = {}
    if text.lstrip().startswith("{"):
        try:
            cond = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
    else:
        for item in filter(None, text.split(",")):
            key, has_value, value = item.partition("=")
            key = key.strip()
            if key in _COND_NUMBERS:
                try:
                    number = float(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{key} needs a number, not {value!r}"
                                                     ) from None
                cond[key] = int(number) if number.is_integer() and "." not in value else number
            elif key in ("band", "edge"):
                flag = _COND_BOOLEANS.get(value.strip().lower()) if has_value else True
                if flag is None:
                    raise argparse.ArgumentTypeError(f"{key} is true or false, not {value!r}")
                cond[key] = flag
            else:
                cond[key] = value  # path, and unknown names for the check below to name
    try:
        parse_condition(cond)
    except ConditionError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("'cond.", "'")) from None
    return cond


def _token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", metavar="TOKEN",
                        help=f"the gateway's access token (default: ${TOKEN_ENV})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"coap-ws-gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _setup_logging(level: str, log_format: str = "text") -> None:
    from .logs import limit_every_record

    handler = logging.StreamHandler(sys.stderr)
    # Nothing repeated floods the log: a line repeated at anyone's will (a failed accept, a
    # sensor's garbage, a client's) costs a few lines and "...and N more" per 10 s. What
    # was counted when the process ends is said then (before logging's own exit hook).
    atexit.register(limit_every_record(handler).close)
    if log_format == "json":
        from .logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _run_until_signal(start: Callable[[], Awaitable[Callable[[], Awaitable[None]]]]) -> int:
    """Run `start()` (which returns the matching stop coroutine function) until a signal."""

    async def runner() -> int:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_event.set)
        stop = await start()
        await stop_event.wait()
        try:
            async with asyncio.timeout(STOP_BUDGET):
                await stop()
        except TimeoutError:
            logging.getLogger(__name__).warning("shutdown took longer than %g s", STOP_BUDGET)
        return EXIT_OK

    return asyncio.run(runner())


def _ready(line: str) -> None:
    print(line, flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else config_from_mapping({})
    config = apply_overrides(
        config,
        host=args.host,
        port=args.port,
        sensors=args.sensor,
        allow=args.allow,
        linger=args.linger,
        log_level=args.log_level,
        log_format=args.log_format,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        no_auth=args.no_auth,
        metrics_listen=args.metrics_listen,
        nats=args.nats,
        node=args.node,
        nats_files={
            "credentials": args.nats_credentials, "tls_ca": args.nats_tls_ca,
            "tls_cert": args.nats_tls_cert, "tls_key": args.nats_tls_key,
        },
    )
    _setup_logging(config.log_level, config.log_format)
    return _serve(config, announce=lambda url: _ready(f"listening on {url}"))


def _serve(config: GatewayConfig, announce: Callable[[str], None]) -> int:
    from translator.gateway import Gateway

    async def start() -> Callable[[], Awaitable[None]]:
        gateway = Gateway(config)
        try:
            await gateway.start()
        except OSError as exc:
            await gateway.stop()
            raise UsageError(
                f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}"
            ) from None
        announce(gateway.url)
        return gateway.stop

    return _run_until_signal(start)


def _cmd_demo(args: argparse.Namespace) -> int:
    from translator.gateway import Gateway
    from translator.sim import SimulatedSensors

    _setup_logging(args.log_level, args.log_format)

    async def start() -> Callable[[], Awaitable[None]]:
        sensors = SimulatedSensors(args.host, args.coap_port)
        try:
            await sensors.start()
        except OSError as exc:
            raise UsageError(f"cannot bind the simulated sensors: {exc.strerror}") from None
        base = sensors.base_uri
        names = {
            "demo/temperature": f"{base}/temperature",
            "demo/humidity": f"{base}/humidity",
            "demo/status": f"{base}/status",
            "demo/led": f"{base}/led",
        }
        listen = f"[{args.host}]:{args.rd_port}" if ":" in args.host else \
            f"{args.host}:{args.rd_port}"
        config = config_from_mapping({
            "server": {"host": args.host, "port": args.port},
            "policy": {"allow": [f"{base}/*"]},
            **({
                # The sensors register as endpoint "demo": named demo/temperature etc.,
                # as the configured ones are without --rd.
                "coap": {"listen": [listen]},
                "rd": {"allow_from": [args.host], "endpoints": ["demo"]},
            } if args.rd else {
                "sensors": [
                    {"name": name, "uri": uri, "observe": name != "demo/status"}
                    for name, uri in names.items()
                ],
            }),
        })
        gateway = Gateway(config)
        try:
            await gateway.start()
        except OSError as exc:
            await sensors.stop()
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
        registerer: Any = None
        if args.rd:
            assert gateway.registry.server is not None
            rd_host, rd_port = gateway.registry.server.addresses[0]
            rd_uri = f"coap://[{rd_host}]:{rd_port}" if ":" in rd_host else \
                f"coap://{rd_host}:{rd_port}"
            registerer = sensors.register_at(rd_uri, "demo", lt=DEMO_LIFETIME)
            print(f"resource directory on {rd_uri}; the sensors register as 'demo'",
                  flush=True)
        url = gateway.url
        page = url.removesuffix("/ws").replace("ws", "http", 1) + "/"
        print(f"simulated sensors on {base}", flush=True)
        print(f"listening on {url}", flush=True)
        print(f"open {page} in a browser for a live view", flush=True)
        print("sensors: " + ", ".join(names), flush=True)
        print("try:", flush=True)
        print(f"  coap-ws-gateway subscribe {url} demo/temperature --count 5", flush=True)
        print(f"  coap-ws-gateway request {url} PUT demo/led --value '{{\"on\": true}}'",
              flush=True)
        print(f'  or send {{"type":"subscribe","id":1,"name":"demo/temperature"}} to {url}',
              flush=True)

        async def stop() -> None:
            if registerer is not None:
                await registerer.shutdown()
            await gateway.stop()
            await sensors.stop()

        return stop

    return _run_until_signal(start)


DEMO_LIFETIME: Final = 120
"""`lt` of the demo sensors' registration with --rd (renewed every 90 s by aiocoap's client)."""


def _cmd_sensors(args: argparse.Namespace) -> int:
    from translator.sim import SimulatedSensors

    _setup_logging(args.log_level)

    async def start() -> Callable[[], Awaitable[None]]:
        sensors = SimulatedSensors(args.host, args.port, interval=args.interval)
        try:
            await sensors.start()
        except OSError as exc:
            raise UsageError(f"cannot bind {args.host}:{args.port}: {exc.strerror}") from None
        _ready(f"simulated sensors on {sensors.base_uri}")
        return sensors.stop

    return _run_until_signal(start)


# -- client subcommands ---------------------------------------------------------------------


def _target_fields(target: str) -> dict[str, str]:
    return {"uri": target} if "://" in target else {"name": target}


async def _connect(url: str, token: str | None) -> Any:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return await connect(url, compression=None, open_timeout=10, additional_headers=headers)
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            what = "the gateway refused the token" if token else "this gateway needs a token"
            raise UsageError(f"{what} (HTTP 401): pass --token or set {TOKEN_ENV}") from None
        raise UsageError(f"the gateway at {url} refused the connection: HTTP {status}") from None
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"cannot reach the gateway at {url}: {exc}") from None
    except Exception as exc:  # InvalidURI, InvalidHandshake...
        raise UsageError(f"cannot connect to {url}: {exc}") from None


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV) or None


def _print(frame: dict[str, Any]) -> None:
    print(json.dumps(frame), flush=True)


def _cmd_subscribe(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise UsageError("--timeout must be a number of seconds greater than 0")

    async def run() -> int:
        ws = await _connect(args.url, _token(args))
        try:
            async with asyncio.timeout(args.timeout):
                return await _follow(
                    ws, args.targets, args.count, args.cond, args.compact
                )
        except TimeoutError:
            if args.count is None:
                return EXIT_OK
            print(f"coap-ws-gateway: fewer than {args.count} notify frames within "
                  f"{args.timeout:g} s", file=sys.stderr)
            return EXIT_FAILED
        finally:
            await ws.close()

    return _run_client(run)


async def _follow(
    ws: Any, targets: Sequence[str], count: int | None, cond: dict[str, Any] | None = None,
    compact: bool = False,
) -> int:
    """Subscribe to `targets` and print what comes, until `count` notify frames, or every
    target has failed: an error frame, or `offline` with a 4.xx code (the resource is not
    there, or the gateway may not have it; retrying will not change that)."""
    from websockets.exceptions import ConnectionClosed

    subs: dict[str, int] = {}
    failed: set[int] = set()
    notified = 0
    try:
        for number, target in enumerate(targets, 1):
            await ws.send(json.dumps({"type": "subscribe", "id": number,
                                      **_target_fields(target),
                                      **({} if cond is None else {"cond": cond}),
                                      **({"compact": True} if compact else {})}))
        async for message in ws:
            frame = json.loads(message)
            kind = frame.get("type")
            if kind == "subscribed":
                subs[frame.get("sub")] = frame.get("id")
                continue
            _print(frame)
            if kind == "notify":
                notified += 1
                if count is not None and notified >= count:
                    return EXIT_OK
            elif kind == "error" and frame.get("id") in range(1, len(targets) + 1):
                failed.add(frame["id"])
            elif (kind == "status" and frame.get("state") == "offline"
                  and str(frame.get("code", "")).startswith("4.") and frame.get("sub") in subs):
                failed.add(subs[frame["sub"]])
            if len(failed) == len(targets):
                return EXIT_FAILED
    except ConnectionClosed:
        pass
    print("coap-ws-gateway: the gateway closed the connection", file=sys.stderr)
    return EXIT_FAILED


def _cmd_list(args: argparse.Namespace) -> int:
    async def run() -> int:
        ws = await _connect(args.url, _token(args))
        try:
            return await _exchange(ws, {"type": "list", "id": 1},
                                   lambda reply: reply["type"] == "resources")
        finally:
            await ws.close()

    return _run_client(run)


def _cmd_request(args: argparse.Namespace) -> int:
    frame: dict[str, Any] = {"type": "request", "id": 1, "method": args.method,
                             **_target_fields(args.target), "timeout": args.timeout}
    if args.value is not None:
        try:
            frame["value"] = json.loads(args.value)
        except ValueError as exc:
            raise UsageError(f"--value is not valid JSON: {exc}") from None
    if args.payload_file is not None:
        try:
            with open(args.payload_file, "rb") as f:
                frame["payload_b64"] = base64.b64encode(f.read()).decode()
        except OSError as exc:
            raise UsageError(f"--payload-file: {exc}") from None
    for key in ("cf", "accept"):
        if getattr(args, key) is not None:
            frame[key] = getattr(args, key)
    if args.non:
        frame["confirmable"] = False

    async def run() -> int:
        ws = await _connect(args.url, _token(args))
        try:
            return await _exchange(
                ws, frame,
                lambda reply: reply["type"] == "response"
                and str(reply.get("code")).startswith("2."),
            )
        finally:
            await ws.close()

    return _run_client(run)


async def _exchange(ws: Any, frame: dict[str, Any], ok: Callable[[dict[str, Any]], bool]) -> int:
    """Send `frame` and print the reply that carries its id: exit 0 when `ok(reply)`."""
    from websockets.exceptions import ConnectionClosed

    await ws.send(json.dumps(frame))
    try:
        async for message in ws:
            reply = json.loads(message)
            if reply.get("id") == frame["id"]:
                _print(reply)
                return EXIT_OK if ok(reply) else EXIT_FAILED
    except ConnectionClosed:
        pass
    raise UsageError("the gateway closed the connection before answering")


def _run_client(run: Callable[[], Awaitable[int]]) -> int:
    async def guarded() -> int:
        return await run()

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(guarded())
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "sensors": _cmd_sensors,
    "subscribe": _cmd_subscribe,
    "request": _cmd_request,
    "list": _cmd_list,
}

