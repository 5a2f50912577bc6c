"""The operator's view: Prometheus metrics of a running gateway, read when scraped.

prometheus-client writes the exposition format; what it exposes is read from the gateway's
own counters at scrape time (`GatewayCollector`), so that the hot path pays nothing for
metrics: the hub and the WebSocket side count per update or per event, never per
subscriber. The only metrics recorded as they happen are the requests' (by method and
outcome, and their latency), one observation per request.

Access is the wiring module's business (`Gateway.metrics`): with tokens configured, only a
token with the ``metrics`` scope reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from translator.gateway import Gateway

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; CoAP requests on a constrained network take tens of milliseconds to seconds."""


class GatewayMetrics:
    """A registry of one gateway's metrics (not the process-global one: several gateways
    may run in one process, as in the tests)."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "coap_ws_gateway_requests", "CoAP requests forwarded for clients, by method and "
            "outcome (the response class 2.xx/4.xx/5.xx, or timeout, upstream_error, error)",
            ("method", "outcome"), registry=self.registry,
        )
        self.request_seconds = Histogram(
            "coap_ws_gateway_request_seconds", "Time from a request frame to its reply",
            ("method",), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(GatewayCollector(gateway))

    def request_done(self, method: str, outcome: str, seconds: float) -> None:
        self.requests.labels(method, outcome).inc()
        self.request_seconds.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class GatewayCollector(Collector):
    """Reads the gateway's counters and sizes when scraped."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway, hub = self.gateway, self.gateway.hub
        yield _gauge("connections", "Open WebSocket connections", len(gateway.ws.connections))
        yield _gauge("subscriptions", "Subscriptions held by connections", hub.subscription_count)
        states = GaugeMetricFamily(
            "coap_ws_gateway_resources", "Observed resources by upstream state", labels=["state"]
        )
        for state, count in hub.states().items():
            states.add_metric([state], count)
        yield states
        yield _gauge("observations", "Upstream observations kept", hub.observing_count)
        yield _counter("updates", "Notifications received from sensors and accepted "
                       "(2.xx representations; each became a notify)", hub.updates_total)
        yield _counter("deliveries", "Notify frames delivered to subscribers (an update "
                       "times its subscribers)", hub.deliveries_total)
        # In a cluster, the hub of what this node observes for every node counts these.
        upstream = gateway.upstream_hub
        yield _counter("registrations", "Upstream registrations sent (GET with Observe: 0)",
                       upstream.registrations_total)
        yield _counter("registration_failures", "Registrations that failed (no answer, RST, "
                       "ICMP, 4.xx/5.xx)", upstream.registration_failures_total)
        yield _counter("upstream_failures", "Upstream failures of any kind: registrations, "
                       "polls and broken observations", upstream.failures_total)
        if gateway.cluster is not None:
            yield _gauge("cluster_owned", "Resources this node observes for the cluster",
                         len(gateway.cluster.owned))
            yield _gauge("cluster_degraded", "1 while cut off from NATS (observing alone)",
                         int(gateway.cluster.problem is not None))
        ws = gateway.ws
        yield _counter("slow_consumer_closes", "Connections closed as slow consumers",
                       ws.slow_consumers_closed)
        yield _counter("slow_consumer_dropped_frames", "Frames that were waiting for a "
                       "connection when it was closed as a slow consumer",
                       ws.slow_consumer_frames_dropped)
        yield _counter("coalesced_frames", "Notify frames a newer one of the same "
                       "subscription replaced while waiting for a slow client (closed "
                       "connections included)", ws.coalesced_total)
        yield _gauge("history_bytes", "Memory of the resume history", hub.history.bytes)
        yield _gauge("idle_bytes", "Memory of remembered unwatched resources", hub.idle_bytes)
        kernel = _kernel_drops(gateway)
        if kernel is not None:
            yield _counter("udp_kernel_drops", "Datagrams the kernel dropped at the CoAP "
                           "sockets because their receive buffers were full (Linux: "
                           "/proc/net/udp)", kernel)
        dropped = CounterMetricFamily(
            "coap_ws_gateway_coap_dropped", "Datagrams the CoAP socket dropped, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(_coap_dropped(gateway).items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield from _directory(gateway)


def _directory(gateway: Gateway) -> Iterator[Metric]:
    """The Resource Directory's size and refusals, and the catalogue it fills."""
    registry = gateway.registry
    yield _gauge("catalogued", "Resources in the catalogue that registered themselves or were "
                 "read from another directory", len(registry.catalog))
    if registry.directory is None or registry.server is None:
        return
    yield _gauge("rd_registrations", "Registrations at the gateway's Resource Directory",
                 len(registry.directory))
    refused = CounterMetricFamily(
        "coap_ws_gateway_rd_refused", "Requests the Resource Directory refused, by CoAP code",
        labels=["code"],
    )
    for code, count in sorted(registry.server.site.refused.items()):
        refused.add_metric([code], count)
    yield refused


def _kernel_drops(gateway: Gateway) -> int | None:
    try:
        return gateway.coap.kernel_drops
    except OSError:  # a socket closed while being looked up: unknown this time
        return None


def _coap_dropped(gateway: Gateway) -> dict[str, int]:
    try:
        return dict(gateway.coap.dropped)
    except RuntimeError:  # not started
        return {}


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"coap_ws_gateway_{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"coap_ws_gateway_{name}", documentation, value=value)
