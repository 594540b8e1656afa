"""Ethernet frames built by hand, sent and captured on a namespace's interface (AF_PACKET): the forged and
raw traffic of test_spoofing, test_dualstack and test_flows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

from sknf import nsutil
from sknf.lab import LabPod
from sknf.pod import pod_mac

ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"
PORT = 9
QUIET = 0.7  # seconds a frame gets to arrive before "not delivered" is believed


# -- building ---------------------------------------------------------------------------------------------

def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: str, src: str, kind: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", kind) + payload


def udp4(src: str, dst: str, payload: bytes, sport: int = 40000, dport: int = PORT) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src),
                       socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + udp


def arp(op: int, sha: str, sip: str, tha: str, tip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_bytes(sha), socket.inet_aton(sip),
                       mac_bytes(tha), socket.inet_aton(tip))


def router_advertisement(src_mac: str) -> bytes:
    """An RA from the link-local address of src_mac to all nodes: default router, lifetime 1800 s, with a prefix."""
    m = mac_bytes(src_mac)
    src = b"\xfe\x80" + bytes(6) + bytes([m[0] ^ 2, m[1], m[2], 0xFF, 0xFE, m[3], m[4], m[5]])  # EUI-64
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1")
    prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                         socket.inet_pton(socket.AF_INET6, "2001:db8:bad::"))
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + prefix
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 255, src, dst) + body


# -- sending and capturing ------------------------------------------------------------------------------

@contextlib.contextmanager
def raw_socket(netns: str, ifname: str = "eth0") -> Iterator[socket.socket]:
    """An AF_PACKET socket on the namespace's interface: sends whole frames, receives every frame."""
    with nsutil.entered(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    try:
        yield sock
    finally:
        sock.close()


def send(netns: str, *frames: bytes) -> None:
    with raw_socket(netns) as s:
        for f in frames:
            s.send(f)


@contextlib.contextmanager
def listening(netns: str) -> Iterator[Callable]:
    """Capture on the namespace's eth0 while the block runs; `seen(marker)` afterwards says whether a frame
    holding marker arrived (waiting up to QUIET seconds for it)."""
    with raw_socket(netns) as s:
        s.setblocking(False)
        got: list[bytes] = []

        def seen(marker: bytes) -> bool:
            deadline = time.monotonic() + QUIET
            while True:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        got.append(s.recv(65535))
                if any(marker in f for f in got):
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)

        yield seen


def mac_of(p: LabPod) -> str:
    """The MAC sknf gave the pod's eth0 (derived from its container id, as the plugin does)."""
    return pod_mac(p.container_id, "eth0")


def marker(tag: str) -> bytes:
    """A payload no other frame carries, to look for in a capture."""
    return f"sks-{tag}-".encode() + os.urandom(6).hex().encode()
