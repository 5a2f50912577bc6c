"""The handshake's defences, end to end: Origin checks and TLS."""

from __future__ import annotations

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
    own = f"http://127.0.0.1:{gateway.ws.port}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.url, origin=own, open_timeout=WAIT)  # type: ignore[arg-type]
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
