"""Every kustomization under deploy/ renders, and what it renders hangs
together: images pinned in one place, references that resolve, the CSI
socket shared, driver names that agree, host access of the node plugins,
flags the programs know, and timeouts that fit the driver's behaviour."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploylib import (
    DEPLOY,
    ROOT,
    cargo_version,
    component,
    containers,
    duration,
    flag,
    flags,
    image_name,
    images_component,
    kubectl,
    kustomizations,
    load_docs,
    name_of,
    overlays,
    pod_spec,
    rel,
    render,
    schema_errors,
    workloads,
)

ALL = kustomizations()
OVERLAYS = overlays()
ids = [rel(d) for d in ALL]
overlay_ids = [rel(d) for d in OVERLAYS]

# Secrets the overlays mount that the user makes (deploy/README.md):
# name -> the keys the pods read.
OUT_OF_BAND_SECRETS = {
    "lodestone-lvm-controller-tls": {"tls.crt", "tls.key", "ca.crt"},
    "lodestone-lvm-snapshot-metadata-tls": {"tls.crt", "tls.key"},
    "lodestone-rbd-snapshot-metadata-tls": {"tls.crt", "tls.key"},
}

# Where each node's own agent certificate, key and CA are on that node
# (put there by the operator; never in a Secret).
NODE_TLS_HOST_DIR = "/etc/lodestone/agent-tls"


def test_every_overlay_is_found():
    assert {rel(d) for d in OVERLAYS} == {
        "deploy/lvm/overlays/cluster",
        "deploy/lvm/overlays/cluster-snapshot-metadata",
        "deploy/lvm/overlays/single-node",
        "deploy/rbd/overlays/cluster",
        "deploy/rbd/overlays/cluster-snapshot-metadata",
        "deploy/rbd/overlays/zones",
    }


@pytest.mark.parametrize("directory", ALL, ids=ids)
def test_renders_without_duplicates(directory):
    objs = render(directory)
    assert objs, f"{rel(directory)} rendered nothing"
    names = [name_of(o) for o in objs]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"duplicate objects: {dupes}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_images_are_pinned_in_the_images_component(directory):
    pins = images_component()
    for w in workloads(render(directory)):
        for c in containers(w):
            image = c["image"]
            name = image_name(image)
            assert name in pins, f"{name_of(w)}: {image} is not in the images component"
            tag = image[len(name) + 1 :]
            assert tag == pins[name]["newTag"], f"{name_of(w)}: {image}"
            assert tag and tag != "latest", image
    assert pins["lodestone"]["newTag"] == cargo_version(), (
        "the lodestone image tag must be the crate version"
    )


def test_sources_name_images_without_tags():
    """Tags live only in the images component, so there is one place to bump."""
    for path in DEPLOY.rglob("*.yaml"):
        for m in re.finditer(r"^\s*image:\s*(\S+)", path.read_text(), re.M):
            assert image_name(m.group(1)) == m.group(1), f"{rel(path)}: tagged image {m.group(1)}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_namespaced_objects_share_the_overlay_namespace(directory):
    objs = render(directory)
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert len(namespaces) == 1, namespaces
    cluster_scoped = {
        "Namespace", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
        "ClusterRole", "ClusterRoleBinding", "SnapshotMetadataService",
    }
    for o in objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] in cluster_scoped:
            assert ns is None, f"{name_of(o)} is cluster-scoped"
        else:
            assert ns in namespaces, f"{name_of(o)} outside {namespaces}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_pod_references_resolve(directory):
    objs = render(directory)
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    for w in workloads(objs):
        spec = pod_spec(w)
        sa = spec.get("serviceAccountName")
        assert sa in by_kind.get("ServiceAccount", set()), f"{name_of(w)}: service account {sa}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        used = set()
        for c in containers(w):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name_of(w)}/{c['name']}: no volume {m['name']}"
                used.add(m["name"])
        assert used == set(volumes), f"{name_of(w)}: unused volumes {set(volumes) - used}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in by_kind.get("ConfigMap", set()), v
            if "secret" in v:
                name = v["secret"]["secretName"]
                assert name in by_kind.get("Secret", set()) or name in OUT_OF_BAND_SECRETS, v


def _mount_dir(container: dict, volume: str) -> str | None:
    for m in container.get("volumeMounts", []):
        if m["name"] == volume:
            return m["mountPath"]
    return None


def _socket_volume(w: dict, path: str) -> str:
    directory = str(Path(path).parent)
    for c in containers(w):
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == directory:
                return m["name"]
    raise AssertionError(f"{name_of(w)}: no volume holds {path}")


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_sidecars_reach_the_driver_socket(directory):
    for w in workloads(render(directory)):
        (driver,) = [c for c in containers(w) if component(c).startswith("lodestone")]
        endpoint = flag(driver, "endpoint")
        assert endpoint.startswith("unix:///"), endpoint
        socket = endpoint[len("unix://") :]
        volume = _socket_volume(w, socket)
        for c in containers(w):
            if c is driver:
                continue
            assert flag(c, "csi-address") == socket, f"{name_of(w)}/{c['name']}"
            assert _mount_dir(c, volume) == str(Path(socket).parent), f"{c['name']}"


def _driver_name(objs) -> str:
    (csidriver,) = [o for o in objs if o["kind"] == "CSIDriver"]
    return csidriver["metadata"]["name"]


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_driver_names_agree(directory):
    objs = render(directory)
    name = _driver_name(objs)
    for o in objs:
        if o["kind"] == "StorageClass":
            assert o["provisioner"] == name, name_of(o)
        if o["kind"] == "VolumeSnapshotClass":
            assert o["driver"] == name, name_of(o)
    for w in workloads(objs):
        spec = pod_spec(w)
        for c in containers(w):
            if component(c).startswith("lodestone"):
                assert f"{flag(c, 'driver')}.lodestone.dev" == name
                assert flag(c, "driver-name") in (None, name)
            if component(c) == "node-driver-registrar":
                path = flag(c, "kubelet-registration-path")
                assert path == f"/var/lib/kubelet/plugins/{name}/csi.sock"
                (sock,) = [v for v in spec["volumes"] if v["name"] == "socket-dir"]
                assert sock["hostPath"]["path"] == str(Path(path).parent)


def _host_paths(w: dict) -> dict[str, dict]:
    """hostPath -> the mount of it in the driver container."""
    spec = pod_spec(w)
    (driver,) = [c for c in containers(w) if component(c).startswith("lodestone")]
    paths = {}
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            for m in driver.get("volumeMounts", []):
                if m["name"] == v["name"]:
                    paths[v["hostPath"]["path"]] = m
    return paths


NODE_HOST_PATHS = {
    "lvm": {"/dev", "/sys", "/run/lvm", "/run/lock/lvm", "/etc/lvm/backup", "/etc/lvm/archive"},
    "rbd": {"/dev", "/sys", "/lib/modules", "/run/mount"},
}


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_node_plugins_have_the_host_access_they_need(directory):
    objs = render(directory)
    nodes = [w for w in workloads(objs) if w["kind"] == "DaemonSet"]
    assert len(nodes) == 1
    (w,) = nodes
    (driver,) = [c for c in containers(w) if component(c).startswith("lodestone")]
    kind = flag(driver, "driver")
    assert driver["securityContext"]["privileged"] is True
    paths = _host_paths(w)
    for kubelet_dir in ("/var/lib/kubelet/pods", "/var/lib/kubelet/plugins"):
        m = paths.get(kubelet_dir)
        assert m and m["mountPath"] == kubelet_dir, kubelet_dir
        assert m.get("mountPropagation") == "Bidirectional", kubelet_dir
    for p in NODE_HOST_PATHS[kind]:
        assert p in paths and paths[p]["mountPath"] == p, f"{kind}: host {p} not mounted at {p}"
    assert paths["/lib/modules"].get("readOnly") if kind == "rbd" else True
    if flag(driver, "mode") == "node":
        # LVM: the controller reaches the agent at the Node's InternalIP;
        # RBD: krbd sessions must outlive the pod's network namespace.
        assert pod_spec(w).get("hostNetwork") is True
        assert flag(driver, "node-id") == "$(NODE_NAME)"


def _ports_of(c: dict) -> set[int]:
    return {p["containerPort"] for p in c.get("ports", [])}


def _listen_ports(c: dict) -> set[int]:
    """Ports a container listens on according to its flags."""
    out = set()
    for name in ("http-endpoint", "agent-listen", "metrics-address"):
        v = flag(c, name)
        if v:
            out.add(int(v.rsplit(":", 1)[1]))
    return out


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_listening_ports_are_declared_and_probes_hit_them(directory):
    for w in workloads(render(directory)):
        served = set()
        for c in containers(w):
            assert _listen_ports(c) <= _ports_of(c), f"{name_of(w)}/{c['name']}"
            served |= _listen_ports(c)
        for c in containers(w):
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                port = probe["httpGet"]["port"]
                if isinstance(port, str):
                    names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                    assert port in names, f"{c['name']} {kind}: no port named {port}"
                    port = names[port]
                assert port in served, f"{name_of(w)}/{c['name']} {kind}: nothing on {port}"


def test_host_network_ports_do_not_collide():
    """Both drivers' node plugins share every node's network."""
    seen: dict[int, str] = {}
    for overlay in ("lvm/overlays/cluster", "rbd/overlays/zones"):
        for w in workloads(render(DEPLOY / overlay)):
            if not pod_spec(w).get("hostNetwork"):
                continue
            for c in containers(w):
                for port in _ports_of(c):
                    where = f"{name_of(w)}/{c['name']}"
                    assert port not in seen, f"port {port}: {seen.get(port)} and {where}"
                    seen[port] = where
    # the usual ports of other CSI drivers' node plugins stay free
    assert not {9808, 9809} & set(seen), seen


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_env_references_in_args_are_defined(directory):
    for w in workloads(render(directory)):
        for c in containers(w):
            defined = {e["name"] for e in c.get("env", [])}
            for arg in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in defined, f"{name_of(w)}/{c['name']}: $({var}) is not in env"


def _lodestone_flags() -> set[str]:
    """Every long flag of src/config.rs (clap derive: field names in
    kebab-case unless `long = "..."` says otherwise)."""
    text = (ROOT / "src" / "config.rs").read_text()
    out = set()
    for attrs, field in re.findall(r"#\[arg\(((?:[^()]|\([^()]*\))*)\)\]\s*pub (\w+):", text, re.S):
        explicit = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
        if explicit:
            out.add(explicit.group(1))
        elif re.search(r"\blong\b", attrs):
            out.add(field.replace("_", "-"))
    return out


# Flags a manifest may use before src/config.rs has them (none today).
PENDING_LODESTONE_FLAGS: set = set()


def test_config_rs_flag_parser_sees_known_flags():
    known = _lodestone_flags()
    assert {"endpoint", "mode", "device-class", "agent", "tls-cert", "agent-resolver"} <= known


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_lodestone_flags_exist(directory):
    known = _lodestone_flags() | PENDING_LODESTONE_FLAGS
    for w in workloads(render(directory)):
        for c in containers(w):
            if component(c).startswith("lodestone"):
                unknown = set(flags(c)) - known
                assert not unknown, f"{name_of(w)}: lodestone has no flag {unknown}"


# The flags each sidecar release documents (README at the pinned tag) that
# a deployment may reasonably set; a typo in a flag name fails here instead
# of in a crash-looping pod.
_LEADER = {
    "leader-election", "leader-election-namespace", "leader-election-lease-duration",
    "leader-election-renew-deadline", "leader-election-retry-period",
}
_COMMON = {"csi-address", "v", "kube-api-qps", "kube-api-burst", "http-endpoint", "metrics-path"}
SIDECAR_FLAGS = {
    "csi-provisioner": _COMMON | _LEADER | {
        "timeout", "retry-interval-start", "retry-interval-max", "worker-threads",
        "extra-create-metadata", "enable-capacity", "capacity-ownerref-level",
        "capacity-poll-interval", "capacity-threads", "capacity-for-immediate-binding",
        "node-deployment", "node-deployment-immediate-binding", "feature-gates",
        "strict-topology", "immediate-topology", "default-fstype",
    },
    "csi-snapshotter": _COMMON | _LEADER | {
        "timeout", "retry-interval-start", "retry-interval-max", "worker-threads",
        "extra-create-metadata", "node-deployment", "feature-gates",
    },
    "csi-resizer": _COMMON | _LEADER | {
        "timeout", "retry-interval-start", "retry-interval-max", "workers",
        "handle-volume-inuse-error", "feature-gates",
    },
    "node-driver-registrar": {"csi-address", "v", "kubelet-registration-path", "http-endpoint",
                              "timeout"},
    "livenessprobe": {"csi-address", "v", "http-endpoint", "probe-timeout"},
}


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_sidecar_flags_exist(directory):
    for w in workloads(render(directory)):
        for c in containers(w):
            comp = component(c)
            if comp in SIDECAR_FLAGS:
                unknown = set(flags(c)) - SIDECAR_FLAGS[comp]
                assert not unknown, f"{name_of(w)}/{c['name']}: unknown flags {unknown}"
                for name in ("timeout", "retry-interval-start", "retry-interval-max",
                             "capacity-poll-interval"):
                    if flag(c, name):
                        duration(flag(c, name))


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_leader_election_in_deployments_only(directory):
    for w in workloads(render(directory)):
        for c in containers(w):
            if component(c) not in ("csi-provisioner", "csi-snapshotter", "csi-resizer"):
                continue
            if w["kind"] == "Deployment":
                assert flag(c, "leader-election") == "", f"{c['name']}: no leader election"
                assert flag(c, "leader-election-namespace") == "$(NAMESPACE)"
                env = {e["name"]: e for e in c.get("env", [])}
                assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            else:
                assert flag(c, "leader-election") is None, c["name"]


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_capacity_tracking_matches_the_csidriver(directory):
    objs = render(directory)
    (csidriver,) = [o for o in objs if o["kind"] == "CSIDriver"]
    tracking = csidriver["spec"]["storageCapacity"]
    for w in workloads(objs):
        for c in containers(w):
            if component(c) != "csi-provisioner":
                continue
            assert (flag(c, "enable-capacity") == "") == tracking
            if not tracking:
                continue
            level = {"Deployment": "2", "DaemonSet": "1"}[w["kind"]]
            assert flag(c, "capacity-ownerref-level") == level, "owner must be the workload"
            env = {e["name"] for e in c.get("env", [])}
            assert {"NAMESPACE", "POD_NAME"} <= env
            assert 10 <= duration(flag(c, "capacity-poll-interval")) <= 300


def _node_driver(objs):
    for w in workloads(objs):
        for c in containers(w):
            if component(c) in ("lodestone-node", "lodestone-all"):
                return c
    raise AssertionError("no node plugin")


@pytest.mark.parametrize(
    "directory", [d for d in OVERLAYS if "/lvm/" in str(d)], ids=lambda d: rel(d)
)
def test_lvm_sidecar_timeouts_cover_the_copy_wait(directory):
    """A thick copy answers ABORTED after --copy-wait-seconds: the sidecars'
    call timeout must leave room for that answer, or every copy would time
    out instead of reporting progress."""
    objs = render(directory)
    copy_wait = int(flag(_node_driver(objs), "copy-wait-seconds", "20"))
    for w in workloads(objs):
        for c in containers(w):
            if component(c) in ("csi-provisioner", "csi-snapshotter"):
                assert duration(flag(c, "timeout")) >= 2 * copy_wait, c["name"]


def _parameters(sc: dict) -> dict:
    return sc.get("parameters", {})


def _driver_params(sc: dict) -> set[str]:
    return {k for k in _parameters(sc) if not k.startswith("csi.storage.k8s.io/")}


def _config_map_json(objs, prefix: str):
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)]
    return json.loads(cm["data"]["config.json"])


LVM_CLASS_FIELDS = {
    "name", "volumeGroup", "thinPool", "default", "overprovisionRatio", "spareBytes",
    "poolFullThresholdPercent", "defaultSizeBytes",
}


def test_lvm_device_classes_are_valid():
    """The rules of src/config.rs (LvmConfig::new), on the shipped file."""
    cfg = json.loads((DEPLOY / "lvm" / "base" / "device-classes.json").read_text())
    assert set(cfg) == {"deviceClasses"}
    classes = cfg["deviceClasses"]
    assert classes and sum(1 for c in classes if c.get("default")) <= 1
    names = [c["name"] for c in classes]
    assert len(names) == len(set(names))
    for c in classes:
        assert set(c) <= LVM_CLASS_FIELDS, set(c) - LVM_CLASS_FIELDS
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?", c["name"]), c["name"]
        for key in ("volumeGroup", "thinPool"):
            if key in c:
                assert re.fullmatch(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}", c[key]), c[key]
        assert 1 <= c.get("overprovisionRatio", 5.0) <= 1000
        assert 0 < c.get("poolFullThresholdPercent", 90) <= 100


@pytest.mark.parametrize(
    "directory", [d for d in OVERLAYS if "/lvm/" in str(d)], ids=lambda d: rel(d)
)
def test_lvm_storageclasses(directory):
    objs = render(directory)
    classes = {c["name"] for c in _config_map_json(objs, "lodestone-lvm-config")["deviceClasses"]}
    scs = [o for o in objs if o["kind"] == "StorageClass"]
    assert {_parameters(sc).get("deviceClass") for sc in scs} == {"thin", "thick"}
    for sc in scs:
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer", name_of(sc)
        assert sc["allowVolumeExpansion"] is True
        assert _driver_params(sc) <= {"deviceClass"}, "the driver refuses other parameters"
        assert _parameters(sc)["deviceClass"] in classes
        assert _parameters(sc).get("csi.storage.k8s.io/fstype", "ext4") in ("ext4", "xfs", "btrfs")
    for vsc in [o for o in objs if o["kind"] == "VolumeSnapshotClass"]:
        assert _driver_params(vsc) == set()


RBD_PARAMS = {
    "clusterID", "pool", "dataPool", "imageFeatures", "mkfsOptions", "mounter",
    "topologyConstrainedPools",
}
RBD_FEATURES = {"layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten",
                "journaling"}


@pytest.mark.parametrize(
    "directory", [d for d in OVERLAYS if "/rbd/" in str(d)], ids=lambda d: rel(d)
)
def test_rbd_storageclasses(directory):
    objs = render(directory)
    config = _config_map_json(objs, "lodestone-rbd-config")
    assert isinstance(config, list) and config
    for cluster in config:
        assert set(cluster) == {"clusterID", "monitors"}
        assert cluster["monitors"] and all(re.fullmatch(r"\S+:\d+", m) for m in cluster["monitors"])
    cluster_ids = {c["clusterID"] for c in config}
    for sc in [o for o in objs if o["kind"] == "StorageClass"]:
        p = _parameters(sc)
        assert _driver_params(sc) <= RBD_PARAMS, _driver_params(sc) - RBD_PARAMS
        assert p["clusterID"] in cluster_ids and p["pool"]
        assert set(p.get("imageFeatures", "layering").split(",")) <= RBD_FEATURES
        assert p.get("mounter", "krbd") in ("krbd", "rbd-nbd")
        for step in ("provisioner", "controller-expand", "node-stage"):
            assert p[f"csi.storage.k8s.io/{step}-secret-name"], step
            assert p[f"csi.storage.k8s.io/{step}-secret-namespace"], step
        if "topologyConstrainedPools" in p:
            assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
            pools = json.loads(p["topologyConstrainedPools"])
            for entry in pools:
                assert set(entry) == {"poolName", "domainSegments"} and entry["poolName"]
                for seg in entry["domainSegments"]:
                    assert set(seg) == {"domainLabel", "value"}
    for vsc in [o for o in objs if o["kind"] == "VolumeSnapshotClass"]:
        assert _driver_params(vsc) == set()
        assert vsc["parameters"]["csi.storage.k8s.io/snapshotter-secret-name"]


def test_rbd_zone_overlay_reports_the_zone():
    objs = render(DEPLOY / "rbd" / "overlays" / "zones")
    driver = _node_driver(objs)
    assert flag(driver, "topology") == "topology.kubernetes.io/zone=$(ZONE)"
    (zone,) = [e for e in driver["env"] if e["name"] == "ZONE"]
    assert zone["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['topology.kubernetes.io/zone']"


def test_lvm_tls_wiring():
    """The controller and node plugins read the files the certificate tools
    write, and the node plugins require the identity the controller's
    certificate carries."""
    objs = render(DEPLOY / "lvm" / "overlays" / "cluster")
    by_comp = {}
    for w in workloads(objs):
        for c in containers(w):
            by_comp[component(c)] = (w, c)
    script = (DEPLOY / "lvm" / "certs" / "make-certs.sh").read_text()
    identity = re.search(r"^identity=(\S+)$", script, re.M).group(1)
    cm_cert = load_docs(DEPLOY / "lvm" / "certs" / "cert-manager" / "controller-certificate.yaml")[0]
    w, c = by_comp["lodestone-controller"]
    (vol,) = [v for v in pod_spec(w)["volumes"]
              if v.get("secret", {}).get("secretName") == "lodestone-lvm-controller-tls"]
    where = _mount_dir(c, vol["name"])
    for name, file in (("tls-cert", "tls.crt"), ("tls-key", "tls.key"), ("tls-ca", "ca.crt")):
        assert flag(c, name) == f"{where}/{file}"
    # Each node plugin reads its own files from a directory of its node.
    w, c = by_comp["lodestone-node"]
    (vol,) = [v for v in pod_spec(w)["volumes"]
              if v.get("hostPath", {}).get("path") == NODE_TLS_HOST_DIR]
    assert vol["hostPath"]["type"] == "Directory", vol
    where = _mount_dir(c, vol["name"])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount.get("readOnly") is True, mount
    for name, file in (("tls-cert", "tls.crt"), ("tls-key", "tls.key"), ("tls-ca", "ca.crt")):
        assert flag(c, name) == f"{where}/{file}"
    _, node = by_comp["lodestone-node"]
    assert flag(node, "controller-identity") == identity
    assert cm_cert["spec"]["dnsNames"] == [identity]
    assert cm_cert["spec"]["secretName"] == "lodestone-lvm-controller-tls"
    _, ctrl = by_comp["lodestone-controller"]
    assert flag(ctrl, "agent-resolver") == "kubernetes"
    port = int(flag(node, "agent-listen").rsplit(":", 1)[1])
    assert int(flag(ctrl, "agent-port")) == port


def test_a_user_overlay_can_replace_the_image_and_the_device_classes(tmp_path):
    """What deploy/README.md tells people to do works."""
    overlay = tmp_path
    base = os.path.relpath(DEPLOY / "lvm" / "overlays" / "cluster", overlay)
    (overlay / "classes.json").write_text(
        '{"deviceClasses": [{"name": "fast", "volumeGroup": "nvme", "thinPool": "pool"}]}'
    )
    (overlay / "kustomization.yaml").write_text(
        f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: lodestone
    newName: registry.example.com/storage/lodestone
    newTag: "9.9.9"
configMapGenerator:
  - name: lodestone-lvm-config
    namespace: lodestone-lvm
    behavior: replace
    files:
      - config.json=classes.json
patches:
  - target: {{kind: DaemonSet, name: lodestone-lvm-node}}
    patch: |-
      - op: add
        path: /spec/template/spec/nodeSelector
        value: {{storage.example.com/lvm: "true"}}
"""
    )
    out = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "image: registry.example.com/storage/lodestone:9.9.9" in out.stdout
    assert '"name": "fast"' in out.stdout
    assert '"name": "thin"' not in out.stdout
    (node,) = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] == "DaemonSet"]
    assert node["spec"]["template"]["spec"]["nodeSelector"] == {"storage.example.com/lvm": "true"}
    assert schema_errors(node) == []


def _mounted_secrets(w: dict) -> set[str]:
    """Every Secret a workload's pods can read: volumes (also projected),
    env and envFrom."""
    spec = pod_spec(w)
    names = set()
    for v in spec.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                names.add(src["secret"]["name"])
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                names.add(e["secretRef"]["name"])
    return names


def _secrets_with_private_keys(objs, tool_secrets: dict[str, set[str]]) -> set[str]:
    """Secrets that hold a TLS private key: rendered ones, the ones the
    users make (OUT_OF_BAND_SECRETS) and those the certificate tools write
    or have cert-manager write (name -> keys)."""
    out = set()
    known = dict(OUT_OF_BAND_SECRETS)
    known.update(tool_secrets)
    for o in objs:
        if o["kind"] == "Secret":
            known[o["metadata"]["name"]] = set(o.get("data", {})) | set(o.get("stringData", {}))
    for name, keys in known.items():
        if any(k.endswith(".key") for k in keys):
            out.add(name)
    return out


@pytest.fixture(scope="module")
def cert_tool_secrets(tmp_path_factory) -> dict[str, set[str]]:
    """name -> keys of every Secret the certificate tools make, for two
    nodes: make-certs.sh's manifests and cert-manager's per-node Secrets."""
    out = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(DEPLOY / "lvm" / "certs" / "make-certs.sh"), str(out),
                    "node-a", "node-b"], check=True, capture_output=True)
    secrets = {}
    for f in sorted((out / "secrets").glob("*.yaml")):
        for d in load_docs(f):
            secrets[d["metadata"]["name"]] = set(d["data"])
    proc = subprocess.run(["bash", str(DEPLOY / "lvm" / "certs" / "cert-manager-nodes.sh"),
                           "certificates", "node-a", "node-b"],
                          check=True, capture_output=True, text=True)
    for d in yaml.safe_load_all(proc.stdout):
        if d:
            # cert-manager writes tls.crt, tls.key and ca.crt
            secrets[d["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    cm = load_docs(DEPLOY / "lvm" / "certs" / "cert-manager" / "controller-certificate.yaml")
    for d in cm:
        secrets[d["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    return secrets


@pytest.mark.parametrize("directory", OVERLAYS, ids=overlay_ids)
def test_no_daemonset_mounts_a_secret_with_keys(directory, cert_tool_secrets):
    """A DaemonSet's pods run on every node, so any Secret they mount is
    readable by root on every node: none of them may mount a Secret holding
    a private key (another node's agent key, or the controller's)."""
    objs = render(directory)
    with_keys = _secrets_with_private_keys(objs, cert_tool_secrets)
    assert "lodestone-lvm-node-node-a" in with_keys  # the fixture found them
    for w in workloads(objs):
        if w["kind"] != "DaemonSet":
            continue
        leaked = _mounted_secrets(w) & with_keys
        assert not leaked, f"{name_of(w)} mounts Secrets with private keys: {sorted(leaked)}"
