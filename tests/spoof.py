"""Datagrams with a forged source, and forged ICMP errors, through a raw IPv4 socket.

What an attacker who can forge a source address sends, built byte by byte (RFC 791 for IPv4,
RFC 768 for UDP, RFC 792 for ICMP) and written with IP_HDRINCL, so that the kernel sends
them as they are. On loopback every 127.0.0.0/8 address is local: "another host" is another
127.0.0.x address. Needs Linux and root (CAP_NET_RAW): a test calls `need_raw_sockets()`
first, which skips it with the reason elsewhere and fails it in CI (tests/optional.py).
"""

from __future__ import annotations

import socket
import struct
import sys

from .optional import need

IPPROTO_ICMP, IPPROTO_UDP = 1, 17
ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED = 3, 11
PORT_UNREACH, FRAG_NEEDED = 3, 4


def raw_sockets_missing() -> str | None:
    """Why raw sockets cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return f"raw IPv4 sockets with IP_HDRINCL are used as on Linux, not {sys.platform}"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return "opening a raw socket was refused (not root, no CAP_NET_RAW)"
    except OSError as exc:
        return f"no raw socket: {exc}"
    return None


def need_raw_sockets() -> None:
    need("raw-sockets", raw_sockets_missing())


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ip_header(source: str, destination: str, protocol: int, payload_length: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + payload_length, 0, 0x4000, 64, protocol, 0,
        socket.inet_aton(source), socket.inet_aton(destination),
    )
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:]


def udp_datagram(source: str, sport: int, destination: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying a UDP datagram, with correct checksums."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = (socket.inet_aton(source) + socket.inet_aton(destination)
              + struct.pack("!BBH", 0, IPPROTO_UDP, len(udp)))
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    return ip_header(source, destination, IPPROTO_UDP, len(udp)) + udp


def icmp_error(
    sender: str, icmp_type: int, icmp_code: int, quoted: bytes, *, mtu: int = 0
) -> bytes:
    """An IPv4 packet from `sender` carrying an ICMP error that quotes the IPv4 packet
    `quoted` (a `udp_datagram`); addressed to that packet's source."""
    rest = struct.pack("!HH", 0, mtu) if icmp_type == ICMP_DEST_UNREACH else bytes(4)
    icmp = struct.pack("!BBH", icmp_type, icmp_code, 0) + rest + quoted
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    destination = socket.inet_ntoa(quoted[12:16])
    return ip_header(sender, destination, IPPROTO_ICMP, len(icmp)) + icmp


class Spoofer:
    """A raw socket that sends whole IPv4 packets as they are (broadcast ones too)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)

    def send(self, packet: bytes) -> None:
        self.sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    def udp(self, source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
        self.send(udp_datagram(source[0], source[1], destination[0], destination[1], payload))

    def icmp(self, sender: str, icmp_type: int, icmp_code: int,
             about: tuple[tuple[str, int], tuple[str, int], bytes], *, mtu: int = 0) -> None:
        """An ICMP error from `sender` about the datagram `about` = (source, destination,
        payload), sent to that datagram's source."""
        (source, sport), (destination, dport), payload = about
        quoted = udp_datagram(source, sport, destination, dport, payload)
        self.send(icmp_error(sender, icmp_type, icmp_code, quoted, mtu=mtu))

    def close(self) -> None:
        self.sock.close()
