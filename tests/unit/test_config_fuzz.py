"""`sknf.config.load` on random YAML documents and environments: it returns a sane Config or raises
ConfigError naming the field (or file, or unknown key) at fault; never any other exception."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sknf.config import FIELDS, MAX_FLOW_MAP_CAPACITY, Config, ConfigError, load

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
    st.sampled_from(["10.244.0.0/16", "10.244.1.0/24", "10.244.1.0/29", "::/0", "eth0", "1500", "kernel", "static",
                     "127.0.0.1:9655", "[::1]:9655", "1e3", "0x10", "yes", "off", ".inf", "nan", "-1"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)
KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from(sorted(FIELDS)).map(lambda k: k.replace("_", "-")),
                 TEXT)
# Mostly valid documents with a few fields replaced: the interesting errors are deep in validation.
BASE = {"node_name": "n1", "cluster_cidr": "10.244.0.0/16", "peers_file": "/tmp/peers.yaml"}
DOCS = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=6),
    st.dictionaries(st.sampled_from(sorted(FIELDS)), SCALARS, max_size=4).map(lambda d: {**BASE, **d}),
)
# Both spellings: SKNF_<NAME> for every setting, and the plain names (only three of which are read).
ENVS = st.dictionaries(st.sampled_from(sorted(FIELDS)).map(str.upper) | st.sampled_from(sorted(FIELDS)).map(
    lambda k: "SKNF_" + k.upper()), TEXT | SCALARS.map(str), max_size=4)


def assert_sane(cfg: Config) -> None:
    assert isinstance(cfg, Config)
    assert cfg.node_name and cfg.cluster_cidr == cfg.cluster_cidrs[0]
    assert math.isfinite(cfg.reconcile_interval) and cfg.reconcile_interval > 0
    assert cfg.mtu is None or 576 <= cfg.mtu <= 9000
    assert 1 <= cfg.vxlan_port <= 65535 and 1 <= cfg.vxlan_vni <= 0xFFFFFF
    assert all(any(p.version == c.version and p.subnet_of(c) for c in cfg.cluster_cidrs) for p in cfg.pod_cidrs)
    assert cfg.flow_map_capacity is None or 1 <= cfg.flow_map_capacity <= MAX_FLOW_MAP_CAPACITY


def assert_names_culprit(err: ConfigError, keys: list[str]) -> None:
    msg = str(err)
    head = msg.split(":", 1)[0].split(" (from ", 1)[0]
    assert (msg.startswith("config file ") or head in FIELDS
            or any(msg.startswith(f"{k} (from ") and "unknown setting" in msg for k in keys)), msg


def try_load(text: str, env: dict[str, str], keys: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        try:
            cfg = load(Path(f.name), env)
        except ConfigError as e:
            assert_names_culprit(e, keys)
        else:
            assert_sane(cfg)


@settings(max_examples=300, deadline=None)
@given(doc=DOCS, env=ENVS)
def test_random_documents_and_environments(doc: dict, env: dict[str, str]) -> None:
    try_load(yaml.safe_dump(doc), env, [str(k) for k in doc])


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200) | st.sampled_from(["[1, 2]", "a: [", "mtu: .inf", "- x", "!!python/object:x {}",
                                                     "node_name: n1\ncluster_cidr: 10.244.0.0/16\nmtu: .nan"]),
       env=ENVS)
def test_random_yaml_text(text: str, env: dict[str, str]) -> None:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    try_load(text, env, [str(k) for k in doc] if isinstance(doc, dict) else [])


def test_flow_map_capacity() -> None:
    env = {"NODE_NAME": "n1", "CLUSTER_CIDR": "10.244.0.0/16", "SKNF_PEERS_FILE": "/tmp/peers.yaml"}
    assert load(None, env).flow_map_capacity is None  # follows nf_conntrack_max
    assert load(None, {**env, "SKNF_FLOW_MAP_CAPACITY": "64"}).flow_map_capacity == 64
    for bad in ("0", "-5", "many", str(MAX_FLOW_MAP_CAPACITY + 1)):
        try:
            load(None, {**env, "SKNF_FLOW_MAP_CAPACITY": bad})
        except ConfigError as e:
            assert str(e).startswith("flow_map_capacity"), e
        else:
            raise AssertionError(f"flow_map_capacity {bad!r} accepted")
