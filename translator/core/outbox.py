"""One connection's outgoing frames, and the slow-consumer policy that bounds them.

The outbox is plain Python (no I/O, no event loop): the WebSocket side pushes frames into it
and its writer pops them. The policy it enforces:

    frame pushed                         what happens
    -----------------------------------  ------------------------------------------------------
    notify for a key with one unsent     the unsent one is dropped, the new one queued at the
                                         end (clients see a jump in `seq`, never old-after-new)
    any other frame                      queued; response, status and error are never dropped
    pending bytes > max_pending_bytes    push returns OVERFLOW_BYTES: close as slow consumer
    frames queued > max_frames           push returns OVERFLOW_FRAMES: close as slow consumer
    behind for > max_lag seconds         lagging(now) is true: close as slow consumer

Sizes are UTF-8 bytes (what goes on the wire), not characters. A replaced notify leaves a
dead entry in the queue until the writer reaches it; when dead entries outnumber the live
frames the queue is rebuilt without them, so that memory follows the frames that count
(a fast sensor and a stalled client left 300 000 dead entries behind 256 live ones).

A connection is *behind* from the moment its outbox stops being empty until it is empty
again, or until its writer gets a frame out: each frame written starts the count again.
So `max_lag` closes a client that stops taking frames, never one that takes them more
slowly than they come (it gets the newest value of each subscription, its lag bounded by
what waits outside the outbox, see `web.server`). Because at most one notify per subscription
waits, a stalled client costs at most (one frame per subscription) plus the frames that
are never dropped.
"""

from __future__ import annotations

import collections
from typing import Final

OVERFLOW_BYTES: Final = "pending bytes over the limit"
OVERFLOW_FRAMES: Final = "pending frames over the limit"


class _Entry:
    __slots__ = ("key", "size", "text")

    def __init__(self, text: str | bytes | None, key: str | None, size: int) -> None:
        self.text = text
        self.key = key
        self.size = size


def utf8_size(text: str | bytes) -> int:
    """The UTF-8 length of `text`, without encoding an ASCII one (CPython knows it is); the
    length of a binary frame's bytes."""
    if isinstance(text, bytes):
        return len(text)
    return len(text) if text.isascii() else len(text.encode())


class Outbox:
    """A FIFO of text frames where a newer notify replaces an unsent older one of its key."""

    __slots__ = (
        "_dead",
        "_latest",
        "_queue",
        "behind_since",
        "frames",
        "max_frames",
        "max_lag",
        "max_pending_bytes",
        "pending_bytes",
        "replaced",
    )

    def __init__(self, *, max_pending_bytes: int, max_frames: int, max_lag: float) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.max_frames = max_frames
        self.max_lag = max_lag
        # Created on first use: most connections never queue a frame (the WebSocket side
        # writes straight to the socket while it takes them), and an empty deque is ~600 B.
        self._queue: collections.deque[_Entry] | None = None
        self._latest: dict[str, _Entry] = {}
        self._dead = 0
        """Replaced entries still in the queue."""
        self.pending_bytes = 0
        self.frames = 0
        """Frames waiting (replaced ones no longer count)."""
        self.behind_since: float | None = None
        self.replaced = 0
        """Notifications dropped because a newer one of the same key replaced them."""

    def __len__(self) -> int:
        return self.frames

    def push(self, text: str | bytes, key: str | None, now: float) -> str | None:
        """Queue a frame; returns None, or the overflow reason when the client is too slow.

        `key` marks a droppable notify (its subscription); None is never dropped. `text`
        is a text frame's text, or a binary frame's bytes.
        """
        if key is not None:
            older = self._latest.get(key)
            if older is not None and older.text is not None:
                self.pending_bytes -= older.size
                self.frames -= 1
                self.replaced += 1
                older.text = None  # left in place; pop() skips it
                self._dead += 1
        size = utf8_size(text) if isinstance(text, str) else len(text)
        entry = _Entry(text, key, size)
        if self._queue is None:
            self._queue = collections.deque()
        elif self._dead > self.frames + 16:
            self._queue = collections.deque(e for e in self._queue if e.text is not None)
            self._dead = 0
        self._queue.append(entry)
        if key is not None:
            self._latest[key] = entry
        if self.behind_since is None:
            self.behind_since = now
        self.pending_bytes += size
        self.frames += 1
        if self.pending_bytes > self.max_pending_bytes:
            return OVERFLOW_BYTES
        if self.frames > self.max_frames:
            return OVERFLOW_FRAMES
        return None

    def pop(self) -> str | bytes | None:
        """The next frame to write, or None when nothing waits."""
        queue = self._queue
        while queue:  # None or empty: nothing waits
            entry = queue.popleft()
            text = entry.text
            if text is None:
                self._dead -= 1
                continue
            key = entry.key
            if key is not None and self._latest.get(key) is entry:
                del self._latest[key]
            self.pending_bytes -= entry.size
            self.frames -= 1
            return text
        return None

    def written(self, now: float) -> None:
        """The writer finished writing what it popped: not behind once nothing waits, and
        behind only since `now` while frames still wait (the client took one: it is slow,
        not stalled)."""
        if not self.frames:
            self.behind_since = None
            # Only replaced (dead) entries can be left; drop them with their index.
            self._queue = None
            self._latest.clear()
            self._dead = 0
        else:
            self.behind_since = now

    def lagging(self, now: float) -> bool:
        return self.behind_since is not None and now - self.behind_since > self.max_lag

    def clear(self) -> None:
        self._queue = None
        self._latest.clear()
        self._dead = 0
        self.pending_bytes = self.frames = 0
        self.behind_since = None
