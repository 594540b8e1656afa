"""Test servers for the lab: one process serving in many network namespaces.

For each namespace given, it opens (inside that namespace) a TCP and a UDP socket on the lab's
service ports. The answers say who the server saw as the client, which is how the lab proves that
source addresses are preserved (or SNATed where they must be):

TCP `WHO\\n`          -> `<client ip> <server name>\\n`
TCP `SINK <n>\\n` + n  -> `<bytes received> <sha256>\\n` (bulk transfer over the overlay)
UDP any datagram      -> `<client ip> <server name> <datagram length>`, sent from the address the
                         datagram was sent to (IP_PKTINFO), as a well-behaved UDP server on a host
                         with several addresses does (a node: its own address and its pod gateway)

Stdlib only and started with `python3 -S`, so forty namespaces cost one small process.
Usage: server.py PORT NAME=NETNS_PATH [NAME=NETNS_PATH ...]
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import socketserver
import struct
import sys
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class _TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    name = ""


IP_PKTINFO = 8
PKTINFO = struct.Struct("I4s4s")  # struct in_pktinfo: ifindex, local address, destination address
IPV6_RECVPKTINFO, IPV6_PKTINFO = 49, 50
PKTINFO6 = struct.Struct("16sI")  # struct in6_pktinfo: address, ifindex


class _UDP(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True
    name = ""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        super().server_bind()

    def get_request(self):
        data, ancillary, _, client = self.socket.recvmsg(self.max_packet_size, socket.CMSG_SPACE(PKTINFO.size))
        to = next((PKTINFO.unpack(d)[2] for level, kind, d in ancillary
                   if level == socket.IPPROTO_IP and kind == IP_PKTINFO), None)
        return (data, self.socket, to), client


class _TCP6(_TCP):
    """The same TCP service over IPv6 (dual-stack labs); IPv6-only, so IPv4 clients keep their own server."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class _UDP6(socketserver.ThreadingUDPServer):
    """UDP over IPv6, replying from the address the datagram was sent to (IPV6_PKTINFO) as the IPv4
    server does: an IPv6-only lab's node holds its underlay address and its pod gateway."""

    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET6
    name = ""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.socket.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        super().server_bind()

    def get_request(self):
        data, ancillary, _, client = self.socket.recvmsg(self.max_packet_size, socket.CMSG_SPACE(PKTINFO6.size))
        to = next((PKTINFO6.unpack(d)[0] for level, kind, d in ancillary
                   if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO), None)
        return (data, self.socket, to), client


class TcpHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(100).decode(errors="replace").split()
        if line[:1] == ["WHO"]:
            self.wfile.write(f"{self.client_address[0]} {self.server.name}\n".encode())
        elif line[:1] == ["SINK"] and len(line) == 2 and line[1].isdigit():
            want, got, digest = int(line[1]), 0, hashlib.sha256()
            while got < want:
                chunk = self.rfile.read1(min(1 << 20, want - got))
                if not chunk:
                    break
                got += len(chunk)
                digest.update(chunk)
            self.wfile.write(f"{got} {digest.hexdigest()}\n".encode())


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock, to = self.request
        reply = f"{self.client_address[0]} {self.server.name} {len(data)}".encode()
        if to is None:
            source = []
        elif len(to) == 16:
            source = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, PKTINFO6.pack(to, 0))]
        else:
            source = [(socket.IPPROTO_IP, IP_PKTINFO, PKTINFO.pack(0, to, bytes(4)))]
        sock.sendmsg([reply], source, 0, self.client_address)


def main(argv: list[str]) -> int:
    port = int(argv[0])
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    servers: list[socketserver.BaseServer] = []
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        _setns(path)  # sockets stay in the namespace they were created in
        for cls, handler, addr in ((_TCP, TcpHandler, "0.0.0.0"), (_UDP, UdpHandler, "0.0.0.0"),
                                   (_TCP6, TcpHandler, "::"), (_UDP6, UdpHandler, "::")):
            try:
                srv = cls((addr, port), handler)
            except OSError:  # no IPv6 in this kernel or namespace: IPv4 only
                continue
            srv.name = name
            servers.append(srv)
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main(sys.argv[1:]))
