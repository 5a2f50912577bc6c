"""The CoAP side: everything that speaks to sensors, through aiocoap.

Pure decisions first, then the I/O that carries them out:

- `blocks`: a block-wise representation (RFC 7959) assembled without I/O: feed a block, get
  "request block n", "done" or why it failed. Pure.
- `supervision`: when to register again, when a value is stale, which notification is newer
  (RFC 7641 §3.4), as a state table. Pure.
- `answers`: what the side reports (`CoapAnswer`), its errors, and failures in words a user
  can act on. Pure.
- `guard`: what a datagram may do before aiocoap sees it. Pure.
- `exchanges`: requests and block fetches over aiocoap, driving `blocks`.
- `observations`: the supervised observations over aiocoap, driving `supervision`.
- `batch`: the UDP socket, read in batches through `guard`.
- `security`: the aiocoap context itself, with DTLS and OSCORE.
- `side`: `CoapSide`, the facade the gateway holds.
- `directory`: the gateway's own CoAP server, hosting the Resource Directory (RFC 9176) over
  the pure table `translator.core.directory`.

Private aiocoap APIs are reached through `translator.compat` only.
"""
