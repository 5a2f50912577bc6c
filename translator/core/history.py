"""Each resource's recent notify frames, for clients that resume after a reconnect.

Pure (no I/O, no clock): the hub records every notify it delivers and asks, when a client
subscribes with ``since``, for the frames after a ``seq``. The bounds (``[history]``):

* ``size``: frames per resource (the newest), counting the newest one, which the hub keeps
  anyway as the resource's cached notify: the history itself holds the ``size - 1`` before
  it, so that a resource that changed once costs it nothing;
* ``max_bytes``: memory for all resources together (the frames' text and what keeps them);
  past it the oldest frames go first, whichever resource they belong to.

Either bound 0 turns history off. A resource's frames are contiguous in ``seq`` (the hub
numbers every accepted update), so "every update after N" is kept exactly when the oldest
frame kept is at most N + 1 (or N is the newest).
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Final

__all__ = ["ENTRY_OVERHEAD", "RESOURCE_OVERHEAD", "History"]

ENTRY_OVERHEAD: Final = 240
"""Bytes a kept frame costs besides its text: its tuple (64) and the two integers in it
(56), its place in its resource's list (8), its (key, seq) entry in the eviction order
(64), and the entries of frames already gone that the order keeps until it is compacted
(up to one per live frame; 0.4 on average). Measured (tracemalloc, 1000 resources x 31
frames): 230 to 270 bytes per frame besides the text; `make bench` (history memory): the
RSS of a gateway with full histories less one without, 190 per frame besides the text. It
was 72, which left `history_bytes` (and `max_bytes`) at 0.7 of the memory really used."""
RESOURCE_OVERHEAD: Final = 160
"""Bytes a resource with history costs besides its frames: its list and dictionary entry.
(A list, not a deque: an empty deque is some 600 bytes, and a resource's frames are few.)"""


class History:
    """The last frames of each resource (keyed by URI), bounded per resource and in all."""

    __slots__ = ("_frames", "_order", "bytes", "max_bytes", "size")

    def __init__(self, *, size: int = 32, max_bytes: int = 16 << 20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        """What the kept frames cost now (see `ENTRY_OVERHEAD`)."""
        self._frames: dict[str, list[tuple[int, str, int]]] = {}
        # Every frame recorded, oldest first, as (key, seq): the order in which the global
        # bound evicts. Entries of frames already gone (the per-resource bound, a forgotten
        # key) are skipped when they reach the front, and the deque is compacted when they
        # outnumber the live ones, so that it stays proportional to what is kept.
        self._order: deque[tuple[str, int]] = deque()

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        """Frames kept, in all."""
        return sum(len(frames) for frames in self._frames.values())

    def record(self, key: str, seq: int, text: str) -> None:
        """Keep `text`, the notify frame with number `seq` of the resource `key` (the hub
        records a frame when a newer one replaces it as the resource's cached notify)."""
        if not self.enabled or self.size < 2:
            return
        frames = self._frames.get(key)
        if frames and seq != frames[-1][0] + 1:
            # A gap would break "every update after N": start the resource afresh.
            self.forget(key)
            frames = None
        if frames is None:
            frames = self._frames[key] = []
            self.bytes += RESOURCE_OVERHEAD
        cost = sys.getsizeof(text) + ENTRY_OVERHEAD
        frames.append((seq, text, cost))
        self._order.append((key, seq))
        self.bytes += cost
        if len(frames) > self.size - 1:
            self._drop(key, frames, len(frames) - (self.size - 1))
        self._evict()
        if len(self._order) > 2 * len(self) + 64:
            self._compact()

    def after(self, key: str, seq: int) -> list[str] | None:
        """The frames of `key` numbered after `seq`, oldest first; None when some of them
        are no longer kept (or were never recorded)."""
        frames = self._frames.get(key)
        if not frames:
            return None
        first, last = frames[0][0], frames[-1][0]
        if seq >= last:
            return [] if seq == last else None
        if seq + 1 < first:
            return None
        return [text for number, text, _ in frames if number > seq]

    def kept(self, key: str) -> list[tuple[int, str]]:
        """The frames of `key` kept, as (seq, text), oldest first."""
        return [(number, text) for number, text, _ in self._frames.get(key, ())]

    def newest(self, key: str) -> int | None:
        """The number of the newest frame kept for `key`."""
        frames = self._frames.get(key)
        return frames[-1][0] if frames else None

    def forget(self, key: str) -> None:
        """Drop every frame of `key` (a resource the hub forgets)."""
        frames = self._frames.pop(key, None)
        if frames is not None:
            self.bytes -= sum(cost for _, _, cost in frames) + RESOURCE_OVERHEAD

    def _drop(self, key: str, frames: list[tuple[int, str, int]], count: int) -> None:
        self.bytes -= sum(cost for _, _, cost in frames[:count])
        del frames[:count]
        if not frames:
            del self._frames[key]
            self.bytes -= RESOURCE_OVERHEAD

    def _evict(self) -> None:
        order = self._order
        while self.bytes > self.max_bytes and order:
            key, seq = order.popleft()
            frames = self._frames.get(key)
            if frames and frames[0][0] == seq:
                self._drop(key, frames, 1)

    def _compact(self) -> None:
        live = {(key, number) for key, frames in self._frames.items() for number, _, _ in frames}
        self._order = deque(entry for entry in self._order if entry in live)
