"""The aiocoap client context for protected sensors: transports, credentials, DTLS handshakes.

:mod:`translator.credentials` says what the configuration asks for; this module makes an
aiocoap context do it, and is the only place that knows how aiocoap's DTLS and OSCORE
machinery behaves:

- :func:`client_context` creates the context with the transports the credentials need
  (``oscore``, ``udp6``, ``tinydtls``) and loads them. A credential that cannot be loaded (an
  OSCORE directory that is missing, malformed, or locked by another process) is a
  :class:`~translator.config.ConfigError` naming its ``credentials[i]`` key, so ``serve``
  says what is wrong and exits 2.
- :func:`close_client_context` shuts the context down and then releases the OSCORE contexts:
  their sequence numbers are written back and their directory locks freed.

Two gaps in aiocoap's DTLS client (0.4.x) are closed here, on the transport instance:

- A wrong pre-shared key is silent. The sensor cannot decrypt the gateway's Finished
  message and, as DTLS requires (RFC 6347 §4.1.2.7), drops it without an alert; aiocoap
  then waits for the handshake forever, and every request to that sensor after it waits
  behind it. A handshake not completed within :data:`DTLS_HANDSHAKE_TIMEOUT` is therefore
  abandoned: the requests waiting on it fail with :class:`DtlsHandshakeFailed` (an aiocoap
  ``NetworkError``, reported to clients as ``upstream_error``), and the next request
  starts a fresh handshake, so a sensor that was down recovers too. A wrong *identity*
  needs no help: the sensor answers it with a fatal alert, which aiocoap reports at once.
- A ``coaps://`` URI that no credentials cover makes aiocoap raise a bare ``RuntimeError``;
  it becomes :class:`CredentialsMissing` (an aiocoap error, so ``upstream_error``).

And one in both: aiocoap picks credentials by the longest pattern that matches the whole
request URI, so a path a client writes could choose the key presented to a server. Here the
context's credentials map chooses by the request's origin alone (:class:`_OriginCredentials`),
with the patterns of :func:`translator.config.credential_pattern`, which never overlap.

And one in its OSCORE client: a cancelled observation goes on underneath, decrypting every
notification into a request nobody listens to any more (see :func:`_adapt_oscore`).

Wrong OSCORE keys need nothing: the sensor answers unprotected (4.00 or 4.01), which aiocoap
reports as an error; for a non-confirmable request (an observation registration) the sensor
stays silent and the registration times out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Final

import aiocoap
from aiocoap import defaults as coap_defaults
from aiocoap import error as coap_error
from aiocoap.credentials import CredentialsMap, CredentialsMissingError

from translator import compat
from translator.coap.batch import RECEIVE_BUFFER, batch_reads
from translator.config import ConfigError, GatewayConfig, credential_pattern
from translator.core.uris import UriError, parse_coap_uri
from translator.credentials import transports_for

__all__ = [
    "DTLS_EXTRA",
    "DTLS_HANDSHAKE_TIMEOUT",
    "CredentialsMissing",
    "DtlsHandshakeFailed",
    "check_installed",
    "client_context",
    "close_client_context",
    "dtls_missing",
]

log = logging.getLogger(__name__)

DTLS_HANDSHAKE_TIMEOUT: Final = 5.0
"""Seconds a DTLS handshake may take before it is abandoned. tinydtls retransmits a lost
flight after 1 s, then 2 s, so this survives two losses on a slow link; on loopback a
handshake takes milliseconds."""


DTLS_EXTRA: Final = (
    "pip install 'coap-ws-gateway[dtls]' (it builds tinydtls from source: needs a C compiler "
    "and the autotools)"
)
"""How to get DTLS: the optional extra, and what it needs to build."""


def dtls_missing() -> str | None:
    """Why ``coaps://`` cannot be used in this installation, or None when it can.

    DTLS is an optional extra: aiocoap's DTLS transport needs DTLSSocket, which has no wheel.
    """
    modules = coap_defaults.dtls_missing_modules()
    if not modules:
        return None
    return f"coaps:// needs DTLS, which is not installed ({', '.join(modules)}): {DTLS_EXTRA}"


def check_installed(config: GatewayConfig) -> None:
    """Refuse, at start, a configuration that needs an optional part that is not installed:
    a :class:`~translator.config.ConfigError` naming the first key that needs it."""
    if not any(s.uri.startswith("coaps://") for s in config.sensors) and not any(
        c.kind == "dtls" for c in config.credentials
    ):
        return
    reason = dtls_missing()
    if reason is None:
        return
    for index, sensor in enumerate(config.sensors):
        if sensor.uri.startswith("coaps://"):
            raise ConfigError(f"sensors[{index}].uri", reason)
    for index, entry in enumerate(config.credentials):
        if entry.kind == "dtls":
            raise ConfigError(f"credentials[{index}].match", reason)


class DtlsHandshakeFailed(coap_error.NetworkError):  # type: ignore[misc]
    """A DTLS handshake did not complete: most likely a wrong pre-shared key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CredentialsMissing(coap_error.Error):  # type: ignore[misc]
    """A ``coaps://`` request that no ``[[credentials]]`` entry covers."""


_KEY_FOR_KIND: Final = {"oscore": "oscore_context", "dtls": "dtls_psk"}


async def client_context(
    credentials: Mapping[str, Mapping[str, Any]], receive_buffer: int = RECEIVE_BUFFER
) -> Any:
    """An aiocoap client context that uses `credentials` (from
    :func:`translator.credentials.client_credentials`); plain UDP alone when it is empty.
    `receive_buffer`: bytes asked for its UDP socket's receive buffer."""
    _check_modules(credentials)
    compat.check_aiocoap()
    context = await aiocoap.Context.create_client_context(
        transports=transports_for(credentials)
    )
    # `client_credentials` is the public attribute the transports read at each request.
    context.client_credentials = _OriginCredentials()
    try:
        _load(context.client_credentials, credentials)
        # Reads and writes its UDP socket through the guard, with random tokens; refuses an
        # aiocoap without the internals that needs (compat.CompatError).
        batch_reads(context, receive_buffer=receive_buffer)
    except BaseException:
        await close_client_context(context)
        raise
    for interface in compat.dtls_interfaces(context):
        _adapt_dtls(interface)
    for transport in compat.oscore_transports(context):
        compat.end_oscore_observations_with_interest(transport)
    return context


async def close_client_context(context: Any) -> None:
    """Shut `context` down, then release its OSCORE contexts (sequence numbers written back,
    directory locks freed), so that the directories can be used again at once."""
    await context.shutdown()
    for item in list(context.client_credentials.values()):
        try:
            compat.release_oscore_context(item)
        except Exception:
            log.warning("could not release the OSCORE context in %s",
                        getattr(item, "basedir", "?"), exc_info=True)
    context.client_credentials.clear()


def _check_modules(credentials: Mapping[str, Mapping[str, Any]]) -> None:
    # OSCORE's modules are wheels in the default install; missing ones mean a broken install.
    missing = {
        "dtls": (coap_defaults.dtls_missing_modules, DTLS_EXTRA),
        "oscore": (coap_defaults.oscore_missing_modules, "reinstall coap-ws-gateway"),
    }
    for index, item in enumerate(credentials.values()):
        for kind in item:
            find_missing, remedy = missing[kind]
            modules = find_missing()
            if modules:
                raise ConfigError(
                    f"credentials[{index}].{_KEY_FOR_KIND[kind]}",
                    f"{kind.upper()} needs Python modules that are not installed "
                    f"({', '.join(modules)}): {remedy}",
                )


def _load(target: Any, credentials: Mapping[str, Mapping[str, Any]]) -> None:
    """Load entry by entry, so that a failure names its entry."""
    for index, (pattern, item) in enumerate(credentials.items()):
        kind = next(iter(item))
        try:
            if kind == "oscore":
                basedir = item[kind]["basedir"]
                if not os.path.isdir(basedir):  # else the lock file would create it
                    raise ValueError("no such directory")
                # What load_from_dict does for {"oscore": {"basedir": …}}, with a context
                # class that cleans up after a failed load (see compat.oscore_context_class).
                context = compat.oscore_context_class()(basedir)
                context.authenticated_claims = [pattern]
                target[pattern] = context
            else:
                target.load_from_dict({pattern: dict(item)})
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if kind == "oscore":
                reason = f"cannot use the OSCORE context {item[kind]['basedir']!r}: {reason}"
            raise ConfigError(f"credentials[{index}].{_KEY_FOR_KIND[kind]}", reason) from None


class _OriginCredentials(CredentialsMap):  # type: ignore[misc]
    """aiocoap's credentials map, choosing an entry by the request's origin alone.

    aiocoap's own choice (``CredentialsMap.credentials_from_request``) matches its patterns,
    ``*`` for any run of characters, against the whole request URI, path and query included,
    and takes the longest match: a client that writes ``/.sensors.example:5684/`` into a path
    could make the gateway present the key meant for ``coaps://*.sensors.example:5684/*`` to
    another host. Here the keys are the normalized ``[[credentials]] match`` patterns, and
    only scheme, host and port decide; the configuration refuses overlapping patterns, so at
    most one entry matches.
    """

    def credentials_from_request(self, msg: Any) -> Any:
        text = msg.get_request_uri()
        try:
            uri = parse_coap_uri(text)
        except UriError:
            raise CredentialsMissingError(f"No suitable credentials for {text}") from None
        for pattern, item in self.items():
            if credential_pattern(pattern).matches_origin(uri.scheme, uri.host, uri.port):
                return item
        raise CredentialsMissingError(f"No suitable credentials for {text}")


def _adapt_dtls(interface: Any) -> None:
    """Give up a DTLS handshake that takes longer than `DTLS_HANDSHAKE_TIMEOUT` (with
    `DtlsHandshakeFailed`), and turn aiocoap's missing-credentials RuntimeError into an
    aiocoap error."""

    def failure(where: str) -> BaseException:
        log.info("DTLS handshake with %s not completed within %g s; abandoning it",
                 where, DTLS_HANDSHAKE_TIMEOUT)
        return DtlsHandshakeFailed(
            f"DTLS handshake with {where} not completed within {DTLS_HANDSHAKE_TIMEOUT:g} s "
            "(wrong PSK, or the sensor does not answer)"
        )

    compat.watch_dtls_handshakes(interface, DTLS_HANDSHAKE_TIMEOUT, failure)

    determine_remote = interface.determine_remote

    async def determine(request: Any) -> Any:
        try:
            return await determine_remote(request)
        except coap_error.Error:
            raise
        except RuntimeError as exc:  # aiocoap's CredentialsMissingError
            raise CredentialsMissing(
                f"no DTLS credentials for {request.get_request_uri()}"
            ) from exc

    interface.determine_remote = determine
