"""Protected sensors (issue 4 §7): DTLS with a pre-shared key and OSCORE, end to end.

Each test runs its own sensor that *requires* the protection: a DTLS server (aiocoap's
``tinydtls_server`` transport, nothing else listening) or an OSCORE server (aiocoap's
``OscoreSiteWrapper``, whose resources answer 4.01 to anything not OSCORE-protected), on
loopback with an OS-chosen port, and a real gateway and WebSocket client in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import pytest
import pytest_asyncio
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress, TransportOSCORE

from translator.coap import observations as coap_side
from translator.coap import security as coap_security
from translator.config import ConfigError, CredentialConfig, config_from_mapping
from translator.credentials import client_credentials, transports_for
from translator.gateway import Gateway
from translator.sim import _bound_port

from .conftest import WAIT, Client
from .optional import need

IDENTITY = "gateway-1"
PSK = "sixteen byte key"  # tinydtls takes at most 16 bytes
MASTER_SECRET = "0102030405060708090a0b0c0d0e0f10"
MASTER_SALT = "9e7ca92223786340"


class Temperature(resource.ObservableResource):
    """An observable JSON value; `only_oscore` answers 4.01 to unprotected requests."""

    def __init__(self, only_oscore: bool = False) -> None:
        super().__init__()
        self.only_oscore = only_oscore
        self.value = 21.5
        self.observed = asyncio.Event()

    def update_observation_count(self, newcount: int) -> None:
        if newcount > 0:
            self.observed.set()

    def set(self, value: float) -> None:
        self.value = value
        self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if self.only_oscore and not isinstance(request.remote, OSCOREAddress):
            return aiocoap.Message(code=aiocoap.UNAUTHORIZED, payload=b"OSCORE required")
        return aiocoap.Message(
            payload=json.dumps({"t": self.value}).encode(), content_format=50
        )


class Sensor:
    def __init__(self, context: Any, uri: str, temperature: Temperature) -> None:
        self.context = context
        self.uri = uri
        self.temperature = temperature


def _dtls_bound_port(context: Any) -> int:
    """The port of a ``tinydtls_server`` transport (a simplesocketserver underneath)."""
    for token_manager in context.request_interfaces:
        interface = token_manager.token_interface.message_interface
        pool = getattr(interface, "_pool", None)
        if pool is not None:
            port: int = pool._transport.get_extra_info("socket").getsockname()[1]
            return port
    raise AssertionError("no DTLS server transport")


@pytest_asyncio.fixture
async def dtls_sensor() -> AsyncIterator[Sensor]:
    need("dtls", "DTLSSocket is not installed" if coap_security.dtls_missing() else None)
    site = resource.Site()
    temperature = Temperature()
    site.add_resource(["temp"], temperature)
    credentials = CredentialsMap()
    credentials.load_from_dict({
        ":gateway": {"dtls": {"psk": {"ascii": PSK}, "client-identity": {"ascii": IDENTITY}}}
    })
    # The DTLS server transport binds to the given port + 1 (5683 -> 5684), so -1 asks the
    # OS for a free one. Only DTLS listens: an unprotected request has nowhere to go.
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", -1), transports=["tinydtls_server"],
        server_credentials=credentials,
    )
    port = _dtls_bound_port(context)
    try:
        yield Sensor(context, f"coaps://127.0.0.1:{port}/temp", temperature)
    finally:
        await context.shutdown()


def _oscore_context(directory: Path, sender: str, recipient: str, secret: str) -> str:
    directory.mkdir()
    (directory / "settings.json").write_text(json.dumps({
        "sender-id_hex": sender,
        "recipient-id_hex": recipient,
        "secret_hex": secret,
        "salt_hex": MASTER_SALT,
    }))
    return str(directory)


@pytest.fixture
def gateway_context(tmp_path: Path) -> str:
    """The gateway's side of the OSCORE security context (sender ID empty, recipient 01)."""
    return _oscore_context(tmp_path / "gateway-ctx", "", "01", MASTER_SECRET)


@pytest_asyncio.fixture
async def oscore_sensor(tmp_path: Path) -> AsyncIterator[Sensor]:
    site = resource.Site()
    temperature = Temperature(only_oscore=True)
    site.add_resource(["temp"], temperature)
    credentials = CredentialsMap()
    credentials.load_from_dict({":gateway": {"oscore": {
        "basedir": _oscore_context(tmp_path / "sensor-ctx", "01", "", MASTER_SECRET)
    }}})
    context = await aiocoap.Context.create_server_context(
        OscoreSiteWrapper(site, credentials), bind=("127.0.0.1", 0), transports=["udp6"]
    )
    port = _bound_port(context)
    try:
        yield Sensor(context, f"coap://127.0.0.1:{port}/temp", temperature)
    finally:
        await context.shutdown()
        for item in credentials.values():
            item._destroy()  # release the directory lock now, not at garbage collection


def _config(sensor: Sensor, credentials: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "sensors": [{"name": "temp", "uri": sensor.uri}],
        "credentials": credentials,
        **sections,
    }


def _dtls(sensor: Sensor, identity: str = IDENTITY, psk: str = PSK) -> list[dict[str, Any]]:
    origin = sensor.uri.rsplit("/", 1)[0]
    return [{"match": origin, "dtls_identity": identity, "dtls_psk": psk}]


def _oscore(sensor: Sensor, directory: str) -> list[dict[str, Any]]:
    return [{"match": sensor.uri.rsplit("/", 1)[0] + "/*", "oscore_context": directory}]


async def _check_request_and_subscription(sensor: Sensor, client: Client) -> None:
    reply = await client.call({"type": "request", "method": "GET", "name": "temp"})
    assert reply["type"] == "response", reply
    assert reply["code"] == "2.05" and reply["value"] == {"t": 21.5}

    subscribed = await client.subscribe(name="temp")
    first = await client.next_notify(subscribed["sub"])
    assert first["value"] == {"t": 21.5}
    await asyncio.wait_for(sensor.temperature.observed.wait(), WAIT)
    sensor.temperature.set(-3.25)
    update = await client.wait_for(
        lambda f: f["type"] == "notify" and f["value"] == {"t": -3.25}
    )
    assert update["sub"] == subscribed["sub"] and update["seq"] > first["seq"]


# --- DTLS -------------------------------------------------------------------------------------


async def test_dtls_sensor_request_and_subscription(
    dtls_sensor: Sensor, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(_config(dtls_sensor, _dtls(dtls_sensor)))
    client = await make_client(gateway.url)
    await _check_request_and_subscription(dtls_sensor, client)


async def test_dtls_wrong_psk_fails_request_and_subscription_without_hanging(
    dtls_sensor: Sensor, make_gateway: Any, make_client: Any
) -> None:
    # The sensor drops the gateway's Finished message silently (it cannot decrypt it), so
    # only the handshake watchdog can tell: upstream_error before the request's timeout.
    config = _config(dtls_sensor, _dtls(dtls_sensor, psk="a wrong key!"))
    gateway = await make_gateway(config)
    client = await make_client(gateway.url)
    started = time.monotonic()
    await client.send({"type": "request", "id": "r", "method": "GET", "name": "temp",
                       "timeout": 9})
    await client.send({"type": "subscribe", "id": "s", "name": "temp"})
    reply: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    while reply is None or status is None:
        frame = await client.recv()
        if frame.get("id") == "r":
            reply = frame
        elif frame["type"] == "status" and frame.get("state") == "offline":
            status = frame
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert "DTLS handshake" in reply["message"] and "wrong PSK" in reply["message"]
    assert "DTLS handshake" in status["reason"]
    assert time.monotonic() - started < 9


async def test_dtls_wrong_identity_is_refused_at_once(
    dtls_sensor: Sensor, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(_config(dtls_sensor, _dtls(dtls_sensor, identity="intruder")))
    client = await make_client(gateway.url)
    started = time.monotonic()
    reply = await client.call({"type": "request", "method": "GET", "name": "temp"})
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    # The sensor answers an unknown identity with a fatal alert: no watchdog needed.
    assert time.monotonic() - started < coap_security.DTLS_HANDSHAKE_TIMEOUT


async def test_coaps_uri_without_credentials_is_an_upstream_error(
    dtls_sensor: Sensor, make_gateway: Any, make_client: Any
) -> None:
    config = _config(dtls_sensor, _dtls(dtls_sensor), policy={"allow": ["coaps://*:*/*"]})
    gateway = await make_gateway(config)
    client = await make_client(gateway.url)
    uncovered = "coaps://127.0.0.1:9/temp"  # the sensor's credentials are for another port
    reply = await client.call({"type": "request", "method": "GET", "uri": uncovered})
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert "no DTLS credentials" in reply["message"]


# --- without the DTLS extra (a default install) -------------------------------------------------


@pytest.fixture
def without_dtls(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on a machine where the optional ``dtls`` extra is not installed: the
    import of DTLSSocket fails, as it does when the package is absent."""
    monkeypatch.setitem(sys.modules, "DTLSSocket", None)
    assert coap_security.dtls_missing() is not None


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"sensors": [{"name": "s", "uri": "coaps://127.0.0.1:9/t"}],
          "credentials": [{"match": "coaps://127.0.0.1:9", "dtls_identity": "gw",
                           "dtls_psk": "k"}]}, "sensors[0].uri"),
        ({"credentials": [{"match": "coap://127.0.0.1:9/*", "oscore_context": "/nowhere"},
                          {"match": "coaps://127.0.0.1:9", "dtls_identity": "gw",
                           "dtls_psk": "k"}]}, "credentials[1].match"),
    ],
)
def test_a_config_that_needs_the_missing_dtls_extra_is_exit_2_naming_key_and_install(
    without_dtls: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    sections: dict[str, Any], key: str,
) -> None:
    from translator.cli import main

    lines = ['[server]\nhost = "127.0.0.1"\nport = 0\n']
    for table, entries in sections.items():
        for entry in entries:
            lines.append(f"[[{table}]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in entry.items())
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{key}'" in err and "pip install 'coap-ws-gateway[dtls]'" in err, err
    assert "C compiler" in err


def test_without_dtls_a_plain_configuration_still_starts(without_dtls: None) -> None:
    from translator.gateway import Gateway as Built

    Built(config_from_mapping({"sensors": [{"name": "s", "uri": "coap://127.0.0.1:9/t"}]}))


async def test_a_coaps_frame_without_the_dtls_extra_is_unsupported_before_any_traffic(
    without_dtls: None, make_gateway: Any, make_client: Any
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        gateway = await make_gateway({
            "server": {"host": "127.0.0.1", "port": 0},
            "policy": {"allow": [f"coaps://127.0.0.1:{port}/*", "coap://127.0.0.1:9/*"]},
        })
        client = await make_client(gateway.url)
        uri = f"coaps://127.0.0.1:{port}/temp"
        for frame in ({"type": "subscribe", "uri": uri},
                      {"type": "request", "method": "GET", "uri": uri}):
            reply = await client.call(frame)
            assert reply["type"] == "error" and reply["error"] == "unsupported", reply
            assert "pip install 'coap-ws-gateway[dtls]'" in reply["message"]
        # The policy is checked first: a forbidden coaps:// URI stays forbidden.
        reply = await client.call({"type": "request", "method": "GET",
                                   "uri": "coaps://127.0.0.2:5684/x"})
        assert reply["error"] == "forbidden", reply
        # A round trip after the refusals: had anything been sent, it would be here by now.
        assert (await client.call({"type": "ping"}))["type"] == "pong"
        with pytest.raises(BlockingIOError):
            listener.recv(2048)
    finally:
        listener.close()


# --- OSCORE -----------------------------------------------------------------------------------


async def test_oscore_sensor_request_and_subscription(
    oscore_sensor: Sensor, gateway_context: str, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(_config(oscore_sensor, _oscore(oscore_sensor, gateway_context)))
    client = await make_client(gateway.url)
    await _check_request_and_subscription(oscore_sensor, client)


async def _until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `condition()` holds, checking every few milliseconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (the conditions are other libraries' state)
            await asyncio.sleep(0.01)


async def test_cancelled_oscore_observation_ends_underneath_too(
    oscore_sensor: Sensor, gateway_context: str, make_gateway: Any, make_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coap")
    gateway = await make_gateway(_config(oscore_sensor, _oscore(oscore_sensor, gateway_context)))
    client = await make_client(gateway.url)
    subscribed = await client.subscribe(name="temp")
    await client.next_notify(subscribed["sub"])
    (transport,) = [
        i for i in gateway.coap.context.request_interfaces if isinstance(i, TransportOSCORE)
    ]
    assert transport._tasks  # following the protected observation
    await client.call({"type": "unsubscribe", "sub": subscribed["sub"]})
    await _until(lambda: not transport._tasks)

    # Notifications no longer reach the OSCORE layer: the first one after the end finds the
    # wire observation cancelled, which forgets its token; later ones match nothing and are
    # dropped on read (and a confirmable one is answered with RST, which ends the
    # observation at the sensor). Before, each was decrypted and logged as arriving after
    # the end, forever.
    def unmatched() -> bool:
        return gateway.coap.dropped.get("coap.unmatched", 0) > 0

    for value in range(10):
        oscore_sensor.temperature.set(30.0 + value)
        with contextlib.suppress(TimeoutError):
            await _until(unmatched, timeout=0.5)
            break
    assert unmatched()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("coap")], caplog.text


async def test_oscore_unsubscribe_and_stop_do_not_wait_for_a_deregistration(
    oscore_sensor: Sensor, gateway_context: str, make_client: Any
) -> None:
    # An OSCORE observation cannot be deregistered with its own token (aiocoap cannot send
    # a protected deregistration), so nothing is sent, and nothing is waited for: stopping
    # it is immediate, not DEREGISTRATION_TIMEOUT (2 s) per observation.
    config = config_from_mapping(_config(oscore_sensor, _oscore(oscore_sensor, gateway_context)))
    loop = asyncio.get_running_loop()
    gateway = Gateway(config)
    await gateway.start()
    try:
        client = await make_client(gateway.url)
        sub = (await client.subscribe(name="temp"))["sub"]
        await client.next_notify(sub)
        started = loop.time()
        await client.call({"type": "unsubscribe", "sub": sub})
        stopping = [t for t in asyncio.all_tasks() if t.get_name().startswith("deregister ")]
        await asyncio.wait_for(asyncio.gather(*stopping), WAIT)
        assert loop.time() - started < coap_side.DEREGISTRATION_TIMEOUT / 4
        assert gateway.coap.busy == 0

        # The same at shutdown, for an observation still running.
        sub = (await client.subscribe(name="temp"))["sub"]
        await client.wait_for(lambda f: f["type"] == "notify" and f["seq"] > 1)
    finally:
        started = loop.time()
        await gateway.stop()
    assert loop.time() - started < coap_side.DEREGISTRATION_TIMEOUT / 2


async def test_oscore_sensor_refuses_unprotected_requests(
    oscore_sensor: Sensor, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(_config(oscore_sensor, []))
    client = await make_client(gateway.url)
    reply = await client.call({"type": "request", "method": "GET", "name": "temp"})
    assert reply["type"] == "response" and reply["code"] == "4.01", reply


async def test_oscore_wrong_key_fails_request_and_subscription(
    oscore_sensor: Sensor, tmp_path: Path, make_gateway: Any, make_client: Any
) -> None:
    wrong = _oscore_context(tmp_path / "wrong-ctx", "", "01", "ff" * 16)
    config = _config(
        oscore_sensor, _oscore(oscore_sensor, wrong),
        supervision={"registration_timeout": 1.0, "backoff_min": 5.0},
    )
    gateway = await make_gateway(config)
    client = await make_client(gateway.url)
    started = time.monotonic()
    reply = await client.call({"type": "request", "method": "GET", "name": "temp"})
    # The sensor cannot decrypt the request and says so unprotected (4.00), which the
    # gateway refuses to take as the sensor's answer.
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert time.monotonic() - started < 2

    # A registration is non-confirmable, and the sensor stays silent to those.
    subscribed = await client.subscribe(name="temp")
    status = await client.wait_for(
        lambda f: f["type"] == "status" and f.get("sub") == subscribed["sub"]
        and f["state"] == "offline"
    )
    assert status["reason"]


async def test_oscore_context_is_released_on_stop_and_usable_again(
    oscore_sensor: Sensor, gateway_context: str, make_client: Any
) -> None:
    config = config_from_mapping(_config(oscore_sensor, _oscore(oscore_sensor, gateway_context)))
    for _ in range(2):
        gateway = Gateway(config)
        await gateway.start()
        try:
            client = await make_client(gateway.url)
            reply = await client.call({"type": "request", "method": "GET", "name": "temp"})
            assert reply["type"] == "response" and reply["code"] == "2.05", reply
        finally:
            await gateway.stop()
    # Sequence numbers were written back, so the sensor's replay window accepted the
    # second gateway's requests; the lock is gone.
    assert not (Path(gateway_context) / "lock").exists()
    assert json.loads((Path(gateway_context) / "sequence.json").read_text())["next-to-send"] > 0


async def test_unusable_oscore_context_is_a_config_error_naming_the_key(
    oscore_sensor: Sensor, tmp_path: Path, gateway_context: str
) -> None:
    missing = str(tmp_path / "nowhere")
    bad = tmp_path / "bad-ctx"
    bad.mkdir()
    (bad / "settings.json").write_text('{"sender-id_hex": ""}')
    for directory, words in ((missing, "no such directory"), (str(bad), "missing")):
        entries = [
            {"match": "coap://127.0.0.1/*", "oscore_context": gateway_context},
            {"match": "coap://127.0.0.2/*", "oscore_context": directory},
        ]
        gateway = Gateway(config_from_mapping(_config(oscore_sensor, entries)))
        with pytest.raises(ConfigError) as caught:
            await gateway.start()
        assert caught.value.key == "credentials[1].oscore_context"
        assert words in caught.value.message
    # The failed starts released the first, good context again, and created nothing.
    assert not (Path(gateway_context) / "lock").exists()
    assert not (tmp_path / "nowhere").exists() and not (bad / "lock").exists()


async def test_oscore_context_in_use_is_a_config_error(
    oscore_sensor: Sensor, gateway_context: str, make_gateway: Any
) -> None:
    mapping = _config(oscore_sensor, _oscore(oscore_sensor, gateway_context))
    await make_gateway(mapping)
    second = Gateway(config_from_mapping(mapping))
    with pytest.raises(ConfigError) as caught:
        await second.start()
    assert caught.value.key == "credentials[0].oscore_context"
    assert "lock" in caught.value.message


# --- configuration --------------------------------------------------------------------------


def _error(mapping: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(mapping)
    return caught.value


def test_credentials_entries_are_normalized_like_uris() -> None:
    config = config_from_mapping({"credentials": [
        {"match": "COAPS://Sensor.Example", "dtls_identity": "gw", "dtls_psk": "s3cr3t"},
        {"match": "coaps://10.0.0.*:*/*", "dtls_identity": "gw", "dtls_psk_hex": "00:ff 10"},
        {"match": "coap://[0::1]", "oscore_context": "/etc/ctx"},
        {"match": "coaps://10.1.0.*", "dtls_identity": "gw", "dtls_psk": "k"},
    ]})
    first, second, third, fourth = config.credentials
    assert first.match == "coaps://sensor.example:5684/*"
    assert second.match == "coaps://10.0.0.*:*/*" and second.psk == b"\x00\xff\x10"
    assert third.match == "coap://[::1]:5683/*" and third.kind == "oscore"
    assert fourth.match == "coaps://10.1.0.*:5684/*"
    assert first.matches("coaps://sensor.example:5684/temp")
    assert second.matches("coaps://10.0.0.7:6000/x") and not second.matches("coaps://10.1.0.7/x")
    assert fourth.matches("coaps://10.1.0.7/x") and not fourth.matches("coaps://10.1.0.7:6000/x")
    assert "s3cr3t" not in repr(first) and "hidden" in repr(first)


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ({"match": "coaps://h/*", "dtls_identity": "gw"}, "dtls_psk", "exactly one"),
        ({"match": "coaps://h/*", "dtls_psk": "k"}, "dtls_identity", "required"),
        ({"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk": "k", "dtls_psk_hex": "00"},
         "dtls_psk", "exactly one"),
        ({"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk": "x" * 17},
         "dtls_psk", "1 to 16 bytes"),
        ({"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk_hex": "zz"},
         "dtls_psk_hex", "hex"),
        ({"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk_hex": ""},
         "dtls_psk_hex", "1 to 16 bytes"),
        ({"match": "coaps://h/*", "dtls_identity": "i" * 33, "dtls_psk": "k"},
         "dtls_identity", "1 to 32 bytes"),
        ({"match": "coap://h/*", "dtls_identity": "gw", "dtls_psk": "k"}, "match", "coaps://"),
        ({"match": "coaps://h/*", "oscore_context": "/ctx"}, "match", "coap://"),
        ({"match": "coap://h/*", "oscore_context": "/ctx", "dtls_psk": "k"},
         "oscore_context", "either"),
        ({"match": "coap://h/*", "oscore_context": ""}, "oscore_context", "directory"),
        ({"match": "coap://h/*"}, "match", "no credentials"),
        ({"match": "http://h/*", "oscore_context": "/ctx"}, "match", "coap://"),
        ({"match": "coap*://h/*", "oscore_context": "/ctx"}, "match", "coap://"),
        ({"match": "coap://h/te?p", "oscore_context": "/ctx"}, "match", "origin alone"),
        ({"match": "coaps://h/x/*", "dtls_identity": "gw", "dtls_psk": "k"}, "match",
         "origin alone"),
        ({"match": "coaps://h:x/*", "dtls_identity": "gw", "dtls_psk": "k"}, "match",
         "bad port"),
        ({"match": "coap://h:99999/*", "oscore_context": "/ctx"}, "match", "port"),
        ({"oscore_context": "/ctx"}, "match", "required"),
        ({"match": "coap://h/*", "oscore_context": 7}, "oscore_context", "string"),
        ({"match": "coap://h/*", "oscore": "/ctx"}, "oscore", "unknown key"),
    ],
)
def test_credentials_entry_errors_name_the_key(
    entry: dict[str, Any], key: str, words: str
) -> None:
    error = _error({"credentials": [{"match": "coap://ok/*", "oscore_context": "/a"}, entry]})
    assert error.key == f"credentials[1].{key}"
    assert words in error.message


def test_key_text_never_appears_in_errors() -> None:
    error = _error({"credentials": [
        {"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk": "a secret, too long"}
    ]})
    assert "secret" not in str(error)


def test_duplicate_patterns_are_refused() -> None:
    error = _error({"credentials": [
        {"match": "coaps://h/*", "dtls_identity": "gw", "dtls_psk": "k"},
        {"match": "coaps://H:5684/*", "dtls_identity": "gw", "dtls_psk": "k"},
    ]})
    assert error.key == "credentials[1].match" and "credentials[0]" in error.message


def test_coaps_sensor_needs_dtls_credentials() -> None:
    sensors = [{"name": "a", "uri": "coap://h/a"}, {"name": "b", "uri": "coaps://h/b"}]
    error = _error({"sensors": sensors})
    assert error.key == "sensors[1].uri" and "[[credentials]]" in error.message
    covered = config_from_mapping({"sensors": sensors, "credentials": [
        {"match": "coaps://h", "dtls_identity": "gw", "dtls_psk": "k"}
    ]})
    assert covered.sensors[1].uri == "coaps://h:5684/b"


def test_toml_example_from_the_readme(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("### Protected sensors", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "gateway.toml"
    path.write_text(block)
    from translator.config import load_config

    config = load_config(path)
    assert [entry.kind for entry in config.credentials] == ["dtls", "oscore"]


# --- translation to aiocoap -------------------------------------------------------------------


def test_client_credentials_are_chosen_by_origin_alone() -> None:
    entries = (
        CredentialConfig(match="coaps://127.0.0.1", dtls_identity="gw", dtls_psk="k1"),
        CredentialConfig(match="coaps://*.sensors.example", dtls_identity="gw2",
                         dtls_psk_hex="0102"),
    )
    credentials = client_credentials(entries)
    assert credentials == {
        "coaps://127.0.0.1:5684/*": {
            "dtls": {"psk": {"hex": b"k1".hex()}, "client-identity": {"hex": b"gw".hex()}}
        },
        "coaps://*.sensors.example:5684/*": {
            "dtls": {"psk": {"hex": "0102"}, "client-identity": {"hex": b"gw2".hex()}}
        },
    }
    # A path that spells the other entry's origin: aiocoap's own map, which matches the
    # whole URI and prefers the longest pattern, would present gw2's key to 127.0.0.1.
    tricky = "coaps://127.0.0.1:5684/.sensors.example:5684/"
    plain = CredentialsMap()
    plain.load_from_dict(credentials)
    by_origin = coap_security._OriginCredentials()
    by_origin.load_from_dict(credentials)

    def pick(store: Any, uri: str) -> Any:
        return store.credentials_from_request(aiocoap.Message(code=aiocoap.GET, uri=uri))

    assert pick(plain, tricky).as_dtls_psk() == (b"gw2", b"\x01\x02")
    assert pick(by_origin, tricky).as_dtls_psk() == (b"gw", b"k1")
    assert pick(by_origin, "coaps://127.0.0.1:5684/temp").as_dtls_psk() == (b"gw", b"k1")
    assert pick(by_origin, "coaps://a.sensors.example/x").as_dtls_psk() == (b"gw2", b"\x01\x02")
    with pytest.raises(RuntimeError):  # aiocoap's CredentialsMissingError
        pick(by_origin, "coaps://127.0.0.2:5684/.sensors.example:5684/")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("coaps://127.0.0.1", "coaps://127.0.0.1/*"),
        ("coaps://10.0.0.*", "coaps://10.0.*.7"),
        ("coaps://*", "coaps://h"),
        ("coaps://h:*", "coaps://h"),
        ("coaps://*.example", "coaps://a.*"),
    ],
)
def test_overlapping_credentials_patterns_are_refused(first: str, second: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"credentials": [
            {"match": first, "dtls_identity": "gw", "dtls_psk": "k1"},
            {"match": second, "dtls_identity": "gw", "dtls_psk": "k2"},
        ]})
    assert refused.value.key == "credentials[1].match"
    assert "overlaps" in refused.value.message and "ambiguous" in refused.value.message


def test_disjoint_credentials_patterns_are_accepted() -> None:
    config = config_from_mapping({"credentials": [
        {"match": "coaps://10.0.0.*", "dtls_identity": "gw", "dtls_psk": "k1"},
        {"match": "coaps://10.0.1.*", "dtls_identity": "gw", "dtls_psk": "k2"},
        {"match": "coaps://10.0.0.*:6000", "dtls_identity": "gw", "dtls_psk": "k3"},
        {"match": "coaps://*.example", "dtls_identity": "gw", "dtls_psk": "k4"},
        {"match": "coap://10.0.0.*", "oscore_context": "/ctx"},
    ]})
    assert len(config.credentials) == 5


@pytest.mark.parametrize(
    ("kinds", "transports"),
    [
        ((), ["udp6"]),
        (("dtls",), ["udp6", "tinydtls"]),
        (("oscore",), ["oscore", "udp6"]),
        (("oscore", "dtls"), ["oscore", "udp6", "tinydtls"]),
    ],
)
def test_transports_for(kinds: tuple[str, ...], transports: list[str]) -> None:
    credentials = {f"coap://h{i}/*": {kind: {}} for i, kind in enumerate(kinds)}
    assert transports_for(credentials) == transports

