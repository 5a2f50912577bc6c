"""What a cluster calls things on NATS: pure, no I/O.

A resource's URI may contain anything a CoAP URI may (dots, spaces escaped as %20, wildcards
are not special in CoAP), none of which a NATS subject or a key-value key can carry as is.
Every node derives the same short key from the URI (a SHA-256 prefix), and from it the
resource's subject, lease key, interest keys and `sub`: nodes agree on all of them without
asking each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Final

KEY_HEX: Final = 20
"""Hex digits of the SHA-256 of the URI in a resource's key: 80 bits, so that two URIs of
one cluster sharing a key is out of reach (a birthday bound near 10^12 resources)."""

_NOT_NAME: Final = re.compile(r"[^A-Za-z0-9_-]")


def resource_key(uri: str) -> str:
    """The name every node gives the resource `uri` on NATS."""
    return hashlib.sha256(uri.encode()).hexdigest()[:KEY_HEX]


def cluster_sub(uri: str) -> str:
    """The resource's `sub` on every node of a cluster (a single gateway numbers them
    `s1`, `s2`, ...; a cluster's nodes must agree without asking each other)."""
    return "r" + resource_key(uri)


def default_node_name() -> str:
    """The host name and the process id, with what NATS names cannot hold replaced."""
    return _NOT_NAME.sub("-", f"{socket.gethostname()}-{os.getpid()}")


@dataclass(frozen=True, slots=True)
class Names:
    """The subjects, buckets and stream of the cluster called `cluster`."""

    cluster: str

    @property
    def leases(self) -> str:
        """Bucket: resource key → the node that owns its observation (with a TTL)."""
        return f"{self.cluster}_leases"

    @property
    def interest(self) -> str:
        """Bucket: ``<resource key>.<node>`` → the URI, while that node watches it (TTL)."""
        return f"{self.cluster}_interest"

    @property
    def meta(self) -> str:
        """Bucket: the cluster's epoch (created once, kept)."""
        return f"{self.cluster}_meta"

    @property
    def stream(self) -> str:
        """Stream: every resource's recent frames, by subject."""
        return f"{self.cluster}_frames"

    @property
    def subjects(self) -> str:
        return f"{self.cluster}.r.>"

    def subject(self, key: str) -> str:
        """Where the owner publishes the resource's notify and status frames."""
        return f"{self.cluster}.r.{key}"

    @staticmethod
    def interest_key(key: str, node: str) -> str:
        return f"{key}.{node}"
