"""The lease record a pod's host veth carries in its ifalias: what the IPAM store is rebuilt from."""

from __future__ import annotations

from ipaddress import IPv4Address

from sknf import netlink, overlay
from sknf.ipam import Lease
from sknf.pod import attachment_record, host_veth_name, lease_from_record, pod_mac

CID = "f" * 64  # a CRI runtime's container id


def lease(container_id: str = CID, namespace: str = "default", pod: str = "web-0") -> Lease:
    return Lease(IPv4Address("10.244.1.7"), container_id, "eth0", namespace, pod,
                 host_veth_name(container_id, "eth0"), pod_mac(container_id, "eth0"))


def test_a_record_gives_back_the_lease() -> None:
    original = lease()
    record = attachment_record(original)

    assert record is not None and len(record.encode()) <= netlink.IFALIAS_MAX
    assert lease_from_record(original.host_ifname, record) == original  # creation time is not kept


def test_long_pod_names_give_way_before_the_attachment() -> None:
    original = lease(namespace="n" * 63, pod="p" * 253)
    back = lease_from_record(original.host_ifname, attachment_record(original))

    assert back is not None
    assert (back.key, back.ip, back.mac, back.pod) == (original.key, original.ip, original.mac, "")


def test_an_attachment_too_long_for_an_ifalias_has_no_record() -> None:
    assert attachment_record(lease(container_id="c" * 300)) is None


def test_a_record_on_the_wrong_link_or_garbage_is_no_lease() -> None:
    record = attachment_record(lease())

    assert lease_from_record(host_veth_name("other", "eth0"), record) is None
    for junk in (None, "", "set by an admin", '{"cid": "x"}', '{"cid":"x","if":"eth0","ip":"not-an-ip"}'):
        assert lease_from_record(lease().host_ifname, junk) is None


def test_the_gateway_mac_is_fixed_per_node() -> None:
    assert overlay.gateway_mac_of("10.244.1.1") == "0a:58:0a:f4:01:01"
    assert overlay.gateway_mac_of("10.244.2.1") != overlay.gateway_mac_of("10.244.1.1")
