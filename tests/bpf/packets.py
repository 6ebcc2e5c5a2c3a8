"""Crafted frames for BPF_PROG_TEST_RUN: small scapy builders returning the wire bytes.

Every builder returns a complete Ethernet frame (bytes). The malformed builders cut or
corrupt a well-formed frame on purpose, so each test names exactly what is wrong with it.
"""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

POD_MAC = "02:00:0a:f4:01:0a"
PEER_MAC = "02:00:0a:f4:02:14"

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD

ETH_HLEN = 14
IPV4_HLEN = 20

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_PORT_UNREACH = 3  # code
ICMP_ECHO = 8
ICMP_TIMESTAMP = 13


def _eth(ethertype: int | None = None) -> Ether:
    if ethertype is None:
        return Ether(src=POD_MAC, dst=PEER_MAC)
    return Ether(src=POD_MAC, dst=PEER_MAC, type=ethertype)


def _payload(payload: bytes):
    return Raw(payload) if payload else b""


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S", payload: bytes = b"",
        seq: int = 1000, ack: int = 0) -> bytes:
    """A TCP segment; `flags` in scapy notation ("S", "SA", "A", "PA", "FA", "R")."""
    seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
    return bytes(_eth() / IP(src=src, dst=dst) / seg / _payload(payload))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    return bytes(_eth() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / _payload(payload))


def icmp(src: str, dst: str, type: int = ICMP_ECHO, code: int = 0, id: int = 0x1234,
         seq: int = 1, payload: bytes = b"") -> bytes:
    """An ICMP message that is not an error (echo request/reply, timestamp, ...)."""
    msg = ICMP(type=type, code=code, id=id, seq=seq)
    return bytes(_eth() / IP(src=src, dst=dst) / msg / _payload(payload))


def icmp_error(src: str, dst: str, quoted: IP, type: int = ICMP_DEST_UNREACH,
               code: int = ICMP_PORT_UNREACH) -> bytes:
    """An ICMP error from `src` to `dst` quoting `quoted` (an scapy IP packet, as the
    original sender put it on the wire) the way RFC 792 says: its IP header and the first
    8 bytes of its payload."""
    raw = bytes(quoted)
    ihl = (raw[0] & 0x0F) * 4
    quote = raw[: ihl + 8]
    return bytes(_eth() / IP(src=src, dst=dst) / ICMP(type=type, code=code) / Raw(quote))


def quoted_udp(src: str, dst: str, sport: int, dport: int) -> IP:
    """The datagram an ICMP error refers to: as `src` sent it to `dst`."""
    return IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"q" * 16)


def arp_request(src: str, dst: str) -> bytes:
    return bytes(Ether(src=POD_MAC, dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=POD_MAC, psrc=src, pdst=dst))


def ethertype_only(ethertype: int, payload: bytes = b"") -> bytes:
    """An Ethernet header with the given ethertype followed by `payload` as is."""
    return bytes(_eth(ethertype)) + payload


# -- malformed and truncated frames -------------------------------------------------

def ipv4_cut(frame: bytes, keep_l3: int) -> bytes:
    """`frame` cut `keep_l3` bytes after the Ethernet header."""
    return frame[: ETH_HLEN + keep_l3]


def ipv4_header_with_truncated_l4(src: str, dst: str, proto: int, l4_bytes: int) -> bytes:
    """A complete 20-byte IPv4 header announcing `proto`, followed by only `l4_bytes` bytes
    of that protocol's header (fewer than it needs)."""
    return bytes(_eth() / IP(src=src, dst=dst, proto=proto) / Raw(b"\x00" * l4_bytes))


def ipv4_with_ihl(src: str, dst: str, ihl: int) -> bytes:
    """A UDP datagram whose IHL field is forced to `ihl` (in 32-bit words); the header bytes
    actually present stay 20."""
    frame = bytearray(udp(src, dst, 4000, 53))
    frame[ETH_HLEN] = (frame[ETH_HLEN] & 0xF0) | (ihl & 0x0F)
    return bytes(frame)


def ipv4_with_version(src: str, dst: str, version: int) -> bytes:
    frame = bytearray(udp(src, dst, 4000, 53))
    frame[ETH_HLEN] = (version << 4) | (frame[ETH_HLEN] & 0x0F)
    return bytes(frame)


def ipv4_fragment(src: str, dst: str, *, more_fragments: bool, offset: int) -> bytes:
    """A UDP datagram's fragment: the first one (MF set, offset 0) still carries the UDP
    header; a later one (offset > 0, in 8-byte units) carries only payload."""
    ip = IP(src=src, dst=dst, flags="MF" if more_fragments else 0, frag=offset, id=0x4242)
    if offset == 0:
        return bytes(_eth() / ip / UDP(sport=4000, dport=53) / Raw(b"f" * 32))
    return bytes(_eth() / IP(src=src, dst=dst, proto=17, flags=ip.flags, frag=offset,
                             id=0x4242) / Raw(b"f" * 32))
