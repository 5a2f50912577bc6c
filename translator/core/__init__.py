"""The pure core: wire frames, content-format codecs, URIs and the destination policy, the
subscription hub with its history, one connection's outbox, the rate limits, the Resource
Directory's registration table (`directory`) and the catalogue it fills (`catalog`). No
asyncio and no I/O: the CoAP side and the web side feed it and carry out what it returns."""
