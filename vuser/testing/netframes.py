"""Ethernet / IPv4 / IPv6 / TCP frames for net tests, with the offload
forms a virtio-net driver hands over: partial checksums (NEEDS_CSUM) and
TCP GSO frames, and checks that segments a device made are correct.

Internet checksums (RFC 1071) in plain Python; nothing here is fast.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_P_IPV4, ETH_P_IPV6 = 0x0800, 0x86DD
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
NEEDS_CSUM, DATA_VALID = 1, 2
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80

SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")


def csum_sum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    return start + sum(words)


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, start: int = 0) -> int:
    return ~fold(csum_sum(data, start)) & 0xFFFF


def pseudo_sum(v6: bool, length: int, proto: int = 6) -> int:
    if v6:
        return csum_sum(SRC6 + DST6 + struct.pack("!IxxxB", length, proto))
    return csum_sum(SRC4 + DST4 + struct.pack("!xBH", proto, length))


@dataclass(frozen=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self, size: int = 12, num_buffers: int = 0) -> bytes:
        raw = struct.pack("<BBHHHH", self.flags, self.gso_type, self.hdr_len, self.gso_size,
                          self.csum_start, self.csum_offset)
        return raw if size == 10 else raw + struct.pack("<H", num_buffers)

    @classmethod
    def unpack(cls, data: bytes) -> VnetHdr:
        return cls(*struct.unpack_from("<BBHHHH", data))


def tcp_frame(payload: bytes, *, v6: bool = False, seq: int = 1000, flags: int = TCP_ACK | TCP_PSH,
              dst_mac: bytes = b"\x02\0\0\0\0\x02", src_mac: bytes = b"\x02\0\0\0\0\x01",
              ip_id: int = 0x1234, partial: bool = False) -> bytes:
    """A TCP segment in Ethernet.  ``partial``: the TCP checksum field holds
    the pseudo-header sum only, as a driver leaves it with NEEDS_CSUM;
    otherwise the checksums are complete."""
    tcp_len = 20 + len(payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq & 0xFFFFFFFF, 1, 5 << 4, flags, 65535, 0, 0)
    if partial:
        check = fold(pseudo_sum(v6, tcp_len))
    else:
        check = checksum(tcp + payload, pseudo_sum(v6, tcp_len))
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, tcp_len, 6, 64) + SRC6 + DST6
        ethertype = ETH_P_IPV6
    else:
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0) + SRC4 + DST4
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        ethertype = ETH_P_IPV4
    return dst_mac + src_mac + struct.pack("!H", ethertype) + ip + tcp + payload


def offload_hdr(frame: bytes, *, gso_size: int = 0) -> VnetHdr:
    """The header a driver sends with ``tcp_frame(..., partial=True)``: the
    checksum to complete and, with ``gso_size``, TCP GSO."""
    v6 = struct.unpack_from("!H", frame, 12)[0] == ETH_P_IPV6
    l4 = 14 + (40 if v6 else 20)
    gso = GSO_NONE if not gso_size else (GSO_TCPV6 if v6 else GSO_TCPV4)
    return VnetHdr(NEEDS_CSUM, gso, l4 + 20 if gso_size else 0, gso_size, l4, 16)


@dataclass(frozen=True)
class TcpSegment:
    v6: bool
    ip_id: int
    seq: int
    flags: int
    payload: bytes


def parse_tcp(frame: bytes, *, check: bool = True) -> TcpSegment:
    """Parse a TCP-in-Ethernet frame; with ``check`` verify every length and
    checksum (IPv4 header and TCP) as a receiving stack would."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    v6 = ethertype == ETH_P_IPV6
    if v6:
        plen = struct.unpack_from("!H", frame, 18)[0]
        l4, ip_id = 54, 0
        assert not check or len(frame) == l4 + plen, (len(frame), plen)
        tcp_len = plen
    else:
        assert ethertype == ETH_P_IPV4
        ip = frame[14:34]
        tot = struct.unpack_from("!H", ip, 2)[0]
        ip_id = struct.unpack_from("!H", ip, 4)[0]
        if check:
            assert checksum(ip) == 0, "IPv4 header checksum"
            assert len(frame) == 14 + tot, (len(frame), tot)
        l4 = 34
        tcp_len = tot - 20
    tcp = frame[l4:l4 + tcp_len]
    if check:
        assert checksum(tcp, pseudo_sum(v6, tcp_len)) == 0, "TCP checksum"
    seq = struct.unpack_from("!I", tcp, 4)[0]
    doff = (tcp[12] >> 4) * 4
    return TcpSegment(v6, ip_id, seq, tcp[13], tcp[doff:])


__all__ = ["DATA_VALID", "GSO_NONE", "GSO_TCPV4", "GSO_TCPV6", "NEEDS_CSUM", "TCP_ACK", "TCP_CWR",
           "TCP_FIN", "TCP_PSH", "TcpSegment", "VnetHdr", "checksum", "offload_hdr", "parse_tcp",
           "tcp_frame"]
