"""sknf.rtbulk's requests are byte for byte what pyroute2 compiles for the same operation (its IPBatch
encodes without sending), so the bulk path programs exactly what the one-request-at-a-time path did."""

from __future__ import annotations

import errno
import struct

import pytest
from pyroute2 import IPBatch

from sknf import nlsock, rtbulk

NLMSG = struct.Struct("=IHHII")


def compiled(call) -> tuple[int, int, bytes]:
    """(type, flags, body) of the one message pyroute2 compiles for call(ipbatch)."""
    ipb = IPBatch()
    try:
        call(ipb)
        data = bytes(ipb.batch)
    finally:
        ipb.close()
    length, kind, flags, _seq, _pid = NLMSG.unpack_from(data)
    assert length == len(data)
    return kind, flags, data[NLMSG.size:]


def sent(request: tuple[int, int, bytes]) -> tuple[int, int, bytes]:
    """What Rtnl.apply sends for a request: REQUEST and ACK added to its flags."""
    kind, flags, body = request
    return kind, flags | nlsock.NLM_F_REQUEST | nlsock.NLM_F_ACK, body


@pytest.mark.parametrize("op", ["append", "del"])
@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "02:42:ac:11:00:02"])
def test_fdb_requests_match_pyroute2(op: str, mac: str) -> None:
    ours = sent(rtbulk.fdb_request(op, 7, mac, "198.18.3.4"))
    assert ours == compiled(lambda ipb: ipb.fdb(op, ifindex=7, lladdr=mac, dst="198.18.3.4"))


@pytest.mark.parametrize("table", [4789, 200])
def test_route_replace_matches_pyroute2(table: int) -> None:
    ours = sent(rtbulk.route_request("replace", table, "198.51.100.12", "10.244.2.1", 5))
    theirs = compiled(lambda ipb: ipb.route("replace", family=2, dst="198.51.100.12", dst_len=32,
                                            gateway="10.244.2.1", oif=5, table=table))
    # pyroute2 leaves rtm_table at 254 and lets RTA_TABLE carry the id; sknf writes RT_TABLE_COMPAT (252)
    # for ids above 255, as iproute2 does. The kernel reads RTA_TABLE in both cases.
    assert ours[:2] == theirs[:2]
    assert ours[2][:4] + ours[2][5:] == theirs[2][:4] + theirs[2][5:]
    assert ours[2][4] == (table if table < 256 else rtbulk.RT_TABLE_COMPAT)


def test_route_delete_matches_pyroute2() -> None:
    ours = sent(rtbulk.route_request("del", 4789, "198.51.100.12", dst_len=32))
    theirs = compiled(lambda ipb: ipb.route("del", family=2, dst="198.51.100.12", dst_len=32, table=4789))
    assert ours[:2] == theirs[:2]
    assert ours[2][:4] + ours[2][5:] == theirs[2][:4] + theirs[2][5:]


def test_ipv6_destinations_are_encoded_as_ipv6() -> None:
    kind, _, body = rtbulk.route_request("replace", 4789, "2001:db8::1", "2001:db8::2", 3)
    assert kind == rtbulk.RTM_NEWROUTE and body[0] == 10 and body[1] == 128  # AF_INET6, /128
    _, _, fdb = rtbulk.fdb_request("append", 3, "00:00:00:00:00:00", "2001:db8::7")
    assert bytes.fromhex("20010db8000000000000000000000007") in fdb


def test_bulk_error_names_every_refused_entry() -> None:
    failed = {f"flood entry 198.18.0.{i}": errno.ENODEV for i in range(12)}
    e = rtbulk.BulkError(failed)
    assert e.errno == errno.ENODEV and e.failed == failed
    assert "12 rtnetlink requests refused" in str(e) and "flood entry 198.18.0.0: ENODEV" in str(e)
    assert "and 2 more" in str(e)
