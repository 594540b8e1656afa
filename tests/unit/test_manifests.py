"""The manifests: valid Kubernetes objects, least-privilege RBAC, and a DaemonSet that provides exactly
what the agent, the plugin and the image read (env, config file, host paths, the metrics port)."""

from __future__ import annotations

import re
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sknf import cli, config, install
from sknf.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
STANDARD = ("rbac.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml")
OLDEST_SUPPORTED = "1.25"  # the oldest schema kubernetes-validate ships; sknf needs nothing newer


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (found,) = [d for d in docs(name) if d["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def ds() -> dict:
    return one("daemonset.yaml", "DaemonSet")


@pytest.fixture(scope="module")
def pod(ds: dict) -> dict:
    return ds["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def agent(pod: dict) -> dict:
    (container,) = pod["containers"]
    return container


@pytest.fixture(scope="module")
def cfg(agent: dict, tmp_path_factory) -> config.Config:
    """The configuration the agent ends up with: the ConfigMap's file plus the DaemonSet's environment."""
    path = tmp_path_factory.mktemp("cm") / "config.yaml"
    path.write_text(one("configmap.yaml", "ConfigMap")["data"]["config.yaml"])
    env = {e["name"]: e.get("value", "") for e in agent["env"]}
    env["NODE_NAME"] = "skc-node-1"  # the downward API's value at run time
    return config.load(path, env)


def mounts(pod: dict, agent: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in agent["volumeMounts"]}


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("name", STANDARD)
def test_manifests_match_the_kubernetes_schemas(name: str, version: str) -> None:
    for doc in docs(name):
        kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too


def test_schema_validation_catches_a_misspelt_field(ds: dict) -> None:
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["hostNetWork"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_rbac_is_nodes_read_and_patch_and_policy_inputs_read_only(pod: dict) -> None:
    role = one("rbac.yaml", "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]}]
    account = one("rbac.yaml", "ServiceAccount")["metadata"]
    binding = one("rbac.yaml", "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]
    assert pod["serviceAccountName"] == account["name"]
    assert not [d for n in STANDARD for d in docs(n) if d["kind"] in ("Role", "RoleBinding")]


def test_every_object_lives_in_kube_system() -> None:
    for name in (*STANDARD, "podmonitor.yaml"):
        for doc in docs(name):
            if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                assert doc["metadata"]["namespace"] == "kube-system", (name, doc["kind"])


def test_daemonset_runs_on_every_node_first(ds: dict, pod: dict) -> None:
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_every_env_var_is_a_setting_the_agent_reads(agent: dict, cfg: config.Config) -> None:
    names = [e["name"] for e in agent["env"]]
    assert names == ["NODE_NAME", "CLUSTER_CIDR", "HOST_PHYSICAL_IF"]
    assert all(n.lower() in config.FIELDS for n in names)
    assert agent["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert cfg.node_name == "skc-node-1"
    assert str(cfg.cluster_cidr) == "10.244.0.0/16"  # kubeadm's usual --pod-network-cidr
    assert cfg.host_physical_if is None  # empty: the default route's interface


def test_configmap_is_the_file_the_agent_is_started_with(agent: dict, pod: dict, cfg: config.Config) -> None:
    assert agent["args"][0] in cli.COMMANDS and agent["args"][0] == "agent"
    config_path = Path(agent["args"][agent["args"].index("--config") + 1])
    mount, volume = mounts(pod, agent)[str(config_path.parent)]
    assert volume["configMap"]["name"] == one("configmap.yaml", "ConfigMap")["metadata"]["name"]
    assert config_path.name in one("configmap.yaml", "ConfigMap")["data"]
    assert mount["readOnly"] is True
    assert cfg.peer_source == "kubernetes" and cfg.kubeconfig is None  # the service account
    assert cfg.install_cni is True  # the agent installs the plugin once ready, not an init container


def test_host_paths_are_where_the_agent_and_the_plugin_look(pod: dict, agent: dict, cfg: config.Config) -> None:
    """The plugin runs on the host with paths from the conflist the agent writes: container and host
    paths must be the same for everything the two share."""
    by_path = mounts(pod, agent)
    conflist = install.render_conflist(cfg)["plugins"][0]
    shared = [cfg.state_dir, cfg.run_dir, cfg.cni_bin_dir, cfg.cni_conf_dir,
              Path(conflist["agentSocket"]).parent, Path(conflist["stateDir"]), Path("/run/xtables.lock")]
    for path in shared:
        mount, volume = by_path[str(path)]
        assert volume["hostPath"]["path"] == str(path), path
        assert not mount.get("readOnly"), path
    assert cfg.socket_path.parent == cfg.run_dir


def test_bpffs_and_pod_netns_propagate(pod: dict, agent: dict, cfg: config.Config) -> None:
    by_path = mounts(pod, agent)
    bpffs, volume = by_path["/sys/fs/bpf"]
    assert cfg.bpf_pin_dir.is_relative_to("/sys/fs/bpf")
    assert volume["hostPath"]["path"] == "/sys/fs/bpf"
    assert bpffs["mountPropagation"] == "Bidirectional"  # a bpffs the agent mounts must reach the host
    assert agent["securityContext"]["privileged"] is True  # Kubernetes allows Bidirectional only then
    netns, volume = by_path["/run/netns"]
    assert volume["hostPath"]["path"] == "/run/netns"
    assert netns["mountPropagation"] == "HostToContainer"  # netns the runtime creates later are visible


def test_kernel_headers_are_mounted_where_the_entrypoint_links_them_from(pod: dict, agent: dict) -> None:
    script = (REPO / "scripts" / "container-entrypoint").read_text()
    host_root = re.search(r"^host=\$\{SKNF_HOST_ROOT:-(/\S+)\}", script, re.M).group(1)
    by_path = mounts(pod, agent)
    for host_path in ("/lib/modules", "/usr/src"):
        mount, volume = by_path[host_root + host_path]
        assert volume["hostPath"]["path"] == host_path
        assert mount["readOnly"] is True


def test_one_metrics_port_everywhere(agent: dict, cfg: config.Config) -> None:
    host, port = cfg.metrics_host_port
    assert host == "0.0.0.0"  # kubelet probes the node's address (host network)
    (declared,) = agent["ports"]
    assert (declared["name"], declared["containerPort"]) == ("metrics", port)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["port"] == "metrics"
    (svc_port,) = one("service.yaml", "Service")["spec"]["ports"]
    assert (svc_port["port"], svc_port["targetPort"]) == (port, "metrics")
    (endpoint,) = one("podmonitor.yaml", "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")


def test_selectors_find_the_agent_pods(ds: dict) -> None:
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert one("service.yaml", "Service")["spec"]["selector"].items() <= labels.items()
    monitor = one("podmonitor.yaml", "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probe_paths_are_served_by_the_agent(agent: dict) -> None:
    """The real metrics server answers the probes: /healthz always, /readyz only once ready."""
    ready = {"now": False}
    server = Metrics("skc-node-1", lambda: None).serve(("127.0.0.1", 0), lambda: ready["now"])
    try:
        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(agent["livenessProbe"]["httpGet"]["path"]) == 200
        assert status(agent["startupProbe"]["httpGet"]["path"]) == 200
        assert status(agent["readinessProbe"]["httpGet"]["path"]) == 503
        ready["now"] = True
        assert status(agent["readinessProbe"]["httpGet"]["path"]) == 200
    finally:
        server.shutdown()


def test_the_documented_cleanup_pod_is_valid_and_mounts_what_the_agent_made(pod: dict, agent: dict) -> None:
    text = (REPO / "docs" / "install.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    cleanup_pod = yaml.safe_load(textwrap.dedent(block).replace("__NODE__", "skc-node-1"))
    kubernetes_validate.validate(cleanup_pod, kubernetes_validate.latest_version(), strict=True)
    spec = cleanup_pod["spec"]
    (container,) = spec["containers"]
    assert container["args"][0] == "cleanup" and container["args"][0] in cli.COMMANDS
    assert container["args"][1:] == agent["args"][1:]
    assert {e["name"] for e in container["env"]} <= {e["name"] for e in agent["env"]}
    assert spec["serviceAccountName"] == pod["serviceAccountName"]
    assert spec["hostNetwork"] is True and container["securityContext"] == {"privileged": True}
    agent_mounts = mounts(pod, agent)
    for path, (_, volume) in mounts(spec, container).items():
        agent_volume = agent_mounts[path][1]
        assert volume.get("hostPath", {}).get("path") == agent_volume.get("hostPath", {}).get("path"), path
    skipped = set(agent_mounts) - set(mounts(spec, container))
    assert skipped == {"/host/lib/modules", "/host/usr/src", "/run/netns"}  # compile and pod netns only
