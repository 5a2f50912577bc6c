"""The benchmark harness of coap-ws-gateway (`make bench`, `python -m bench.run`).

Every scenario drives real processes on loopback: `fast_sensor` (a minimal CoAP notifier),
the gateway (`python -m translator serve`), `loadgen` (WebSocket clients), and the baselines
`bare_ws` (a websockets broadcast server) and `bare_coap` (a bare aiocoap client). `run`
orchestrates them, prints the table and writes `bench/results/latest.json` and the chart.
"""
