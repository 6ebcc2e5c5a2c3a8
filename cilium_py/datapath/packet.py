"""The L3/L4 fields of the packet bytes an event record captured (the first
TRACE_PAYLOAD_LEN bytes of an Ethernet frame), decoded once for both readers of events:
`ciliumpy monitor` (datapath/monitor.py) and Hubble's parser (hubble/parser.py).

A capture may be cut short anywhere, so each field is filled only as far as the bytes go.
"""

from __future__ import annotations

import socket
import struct

from cilium_py.vocab import ICMP, SCTP, TCP, UDP

ETH_HLEN = 14
ETH_P_IP = b"\x08\x00"
IPV4_MIN_HLEN = 20
# Protocols whose first four L4 bytes are the source and destination port.
PORT_PROTOCOLS = frozenset({TCP, UDP, SCTP})
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
TCP_NS = 0x100  # the nonce-sum bit, kept above the eight flag bits of byte 13

_PORTS = struct.Struct("!HH")
_ECHO_ID = struct.Struct("!H")


def decode_l3l4(pkt: bytes) -> tuple[str, str, int, int, int, int, int, int] | None:
    """(src, dst, protocol, sport, dport, tcp_flags, icmp_type, icmp_code) of an IPv4
    frame; None when the bytes are not IPv4 or end inside the IP header.

    sport/dport are the ports of TCP, UDP and SCTP, -1 when the capture ends before them.
    For an ICMP echo request or reply sport is the echo identifier, which is how conntrack
    tells such flows apart; other protocols have 0 for both. tcp_flags holds the flag bits
    with NS as TCP_NS, -1 when the capture ends before them; icmp_type and icmp_code are -1
    unless the packet is ICMP and they were captured.
    """
    if len(pkt) < ETH_HLEN + IPV4_MIN_HLEN or pkt[12:14] != ETH_P_IP:
        return None
    proto = pkt[ETH_HLEN + 9]
    l4 = ETH_HLEN + (pkt[ETH_HLEN] & 0x0F) * 4
    sport = dport = 0
    tcp_flags = icmp_type = icmp_code = -1
    if proto in PORT_PROTOCOLS:
        sport = dport = -1
        if len(pkt) >= l4 + 4:
            sport, dport = _PORTS.unpack_from(pkt, l4)
            if proto == TCP and len(pkt) >= l4 + 14:
                tcp_flags = pkt[l4 + 13] | (pkt[l4 + 12] & 1) << 8
    elif proto == ICMP and len(pkt) >= l4 + 2:
        icmp_type, icmp_code = pkt[l4], pkt[l4 + 1]
        if icmp_type in (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST) and len(pkt) >= l4 + 6:
            sport = _ECHO_ID.unpack_from(pkt, l4 + 4)[0]
    addrs = ETH_HLEN + 12
    return (socket.inet_ntoa(pkt[addrs:addrs + 4]), socket.inet_ntoa(pkt[addrs + 4:addrs + 8]),
            proto, sport, dport, tcp_flags, icmp_type, icmp_code)
