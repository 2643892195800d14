"""Least-privilege RBAC: every permission a pod's service account holds is
one that a container of that pod needs, held by the role of that container,
and every need is granted.

The needs of the sidecars are their releases' documented RBAC (the
deploy/kubernetes/rbac*.yaml of each pinned tag), minus what their code only
does for features this deployment does not use, which was checked in their
sources at those tags:
- external-provisioner v6.3.0: VolumeAttachments only for drivers with
  PUBLISH_UNPUBLISH_VOLUME (attachRequired: false here); Secrets only for
  the StorageClasses' provisioner secret (a GET by name); CSIStorageCapacity
  and the owner walk (GET pod, then GET ReplicaSet for a Deployment) only
  with --enable-capacity; Leases only with --leader-election.
- external-snapshotter v8.6.0 (csi-snapshotter): the groupsnapshot.storage
  rules only with --feature-gates=CSIVolumeGroupSnapshot=true; Secrets only
  for the VolumeSnapshotClasses' snapshotter secret.
- external-resizer v2.2.1: Pods only with --handle-volume-inuse-error=true
  (the default); VolumeAttributesClasses only for drivers with
  MODIFY_VOLUME; Secrets only for the controller-expand secret.
- external-snapshot-metadata v1.1.0 (csi-snapshot-metadata): its release's
  ClusterRole also grants get on tokenreviews and subjectaccessreviews and
  list/watch/create/update/patch/delete on snapshotmetadataservices; its
  code only creates the two reviews and gets VolumeSnapshots, their
  contents and its driver's SnapshotMetadataService by name.
- node-driver-registrar and livenessprobe: no API access.
Lodestone's own needs are read from its source: the paths src/ GETs
through the in-cluster client (src/kube.rs).
"""

from __future__ import annotations

import copy
import re

import pytest

from deploylib import (
    ROOT,
    component,
    containers,
    flag,
    name_of,
    overlays,
    pod_spec,
    rel,
    render,
    workloads,
)

OVERLAYS = overlays()
ids = [rel(d) for d in OVERLAYS]

CLUSTER = "cluster"  # scope of a ClusterRole bound by a ClusterRoleBinding
LEASES = ("coordination.k8s.io", "leases", ("get", "watch", "list", "delete", "update", "create"))
EVENTS = ("", "events", ("list", "watch", "create", "update", "patch"))

# (api group, resource, verbs) a component always needs, cluster-wide.
CLUSTER_NEEDS = {
    "csi-provisioner": [
        ("", "persistentvolumes", ("get", "list", "watch", "create", "patch", "delete")),
        ("", "persistentvolumeclaims", ("get", "list", "watch", "update")),
        ("storage.k8s.io", "storageclasses", ("get", "list", "watch")),
        EVENTS,
        # restores: read the source snapshot, keep a finalizer on it
        ("snapshot.storage.k8s.io", "volumesnapshots", ("get", "list", "watch", "update")),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list")),
        # topology
        ("storage.k8s.io", "csinodes", ("get", "list", "watch")),
        ("", "nodes", ("get", "list", "watch")),
    ],
    "csi-snapshotter": [
        EVENTS,
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch")),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents",
         ("get", "list", "watch", "update", "patch")),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("update", "patch")),
    ],
    "csi-snapshot-metadata": [
        ("authentication.k8s.io", "tokenreviews", ("create",)),
        ("authorization.k8s.io", "subjectaccessreviews", ("create",)),
        ("snapshot.storage.k8s.io", "volumesnapshots", ("get",)),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get",)),
        ("cbt.storage.k8s.io", "snapshotmetadataservices", ("get",)),
    ],
    "csi-resizer": [
        ("", "persistentvolumes", ("get", "list", "watch", "patch")),
        ("", "persistentvolumeclaims", ("get", "list", "watch")),
        ("", "persistentvolumeclaims/status", ("patch",)),
        EVENTS,
    ],
}


def _expand(group, resource, verbs, scope, name=None):
    return {(group, resource, v, scope, name) for v in verbs}


def lodestone_api_calls() -> set[tuple]:
    """(group, resource, verb, scope) of every GET in src/ through the
    in-cluster client: a collection path is a list, a path ending in a name
    a get."""
    kube = (ROOT / "src" / "kube.rs").read_text()
    methods = set(re.findall(r"pub(?:\(crate\))? async fn (\w+)", kube))
    assert methods == {"get"}, (
        f"src/kube.rs has request methods {methods}: teach lodestone_api_calls() about them"
    )
    calls = set()
    for path in (ROOT / "src").rglob("*.rs"):
        text = path.read_text()
        for m in re.finditer(r'\.get(?:::<[^>]*>)?\(\s*(?:&format!\(\s*)?"(/apis?/[^"]+)"', text):
            parts = m.group(1).strip("/").split("/")
            if parts[0] == "api":  # /api/v1/...
                group, rest = "", parts[2:]
            else:  # /apis/GROUP/VERSION/...
                group, rest = parts[1], parts[3:]
            scope = CLUSTER
            if rest[0] == "namespaces" and len(rest) > 2:
                scope, rest = "namespace", rest[2:]
            verb = "list" if len(rest) == 1 else "get"
            calls.add((group, rest[0], verb, scope))
    return calls


def test_lodestone_api_calls_are_found():
    assert lodestone_api_calls() == {
        ("storage.k8s.io", "csinodes", "list", CLUSTER),
        ("", "nodes", "get", CLUSTER),
    }


def _secret_refs(objs, kind: str, key: str, driver: str) -> set[tuple[str, str]]:
    refs = set()
    for o in objs:
        if o["kind"] != kind:
            continue
        if (o.get("provisioner") or o.get("driver")) != driver:
            continue
        p = o.get("parameters", {})
        name = p.get(f"csi.storage.k8s.io/{key}-secret-name")
        if name:
            refs.add((p[f"csi.storage.k8s.io/{key}-secret-namespace"], name))
    return refs


def needs(c: dict, w: dict, objs) -> set[tuple]:
    """What container `c` of workload `w` calls, as (group, resource, verb,
    scope, resourceName) with scope CLUSTER or a namespace."""
    comp = component(c)
    ns = w["metadata"]["namespace"]
    (csidriver,) = [o for o in objs if o["kind"] == "CSIDriver"]
    driver = csidriver["metadata"]["name"]
    out: set[tuple] = set()
    for group, resource, verbs in CLUSTER_NEEDS.get(comp, []):
        out |= _expand(group, resource, verbs, CLUSTER)
    leader = flag(c, "leader-election") is not None
    if comp in CLUSTER_NEEDS and leader:
        out |= _expand(*LEASES, ns)
    if comp == "csi-provisioner":
        assert csidriver["spec"]["attachRequired"] is False, "VolumeAttachments would be needed"
        if flag(c, "enable-capacity") is not None:
            out |= _expand("storage.k8s.io", "csistoragecapacities",
                           ("get", "list", "watch", "create", "update", "patch", "delete"), ns)
            level = int(flag(c, "capacity-ownerref-level", "1"))
            if level >= 0:
                out |= _expand("", "pods", ("get",), ns)
            if level >= 2:
                assert w["kind"] == "Deployment"
                out |= _expand("apps", "replicasets", ("get",), ns)
        for secret_ns, name in _secret_refs(objs, "StorageClass", "provisioner", driver):
            out |= _expand("", "secrets", ("get",), secret_ns, name)
    if comp == "csi-snapshotter":
        assert "CSIVolumeGroupSnapshot=true" not in (flag(c, "feature-gates") or "")
        for secret_ns, name in _secret_refs(objs, "VolumeSnapshotClass", "snapshotter", driver):
            out |= _expand("", "secrets", ("get",), secret_ns, name)
    if comp == "csi-resizer":
        if flag(c, "handle-volume-inuse-error", "true") != "false":
            out |= _expand("", "pods", ("get", "list", "watch"), CLUSTER)
        for secret_ns, name in _secret_refs(objs, "StorageClass", "controller-expand", driver):
            out |= _expand("", "secrets", ("get",), secret_ns, name)
    if comp == "lodestone-controller" and flag(c, "agent-resolver") == "kubernetes":
        for group, resource, verb, scope in lodestone_api_calls():
            out.add((group, resource, verb, ns if scope == "namespace" else CLUSTER, None))
    return out


def _rules(role: dict, scope: str) -> set[tuple]:
    out = set()
    for r in role.get("rules", []):
        names = r.get("resourceNames") or [None]
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    for n in names:
                        out.add((g, res, v, scope, n))
    return out


def _roles(objs):
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in objs if o["kind"] in ("Role", "ClusterRole")}


def grants(objs, sa: str, ns: str) -> dict[tuple, set[tuple]]:
    """The roles bound to service account ns/sa, each with its rules."""
    roles = _roles(objs)
    out = {}
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == ns
                   for s in b.get("subjects", [])):
            continue
        ref = b["roleRef"]
        if ref["kind"] == "ClusterRole":
            key = ("ClusterRole", None, ref["name"])
        else:
            key = ("Role", b["metadata"]["namespace"], ref["name"])
        assert key in roles, f"{name_of(b)} binds a missing {key}"
        scope = CLUSTER if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        out[key] = _rules(roles[key], scope)
    return out


def rbac_problems(objs) -> list[str]:
    """Every way the rendered RBAC differs from the components' needs."""
    problems = []
    for w in workloads(objs):
        spec = pod_spec(w)
        sa, ns = spec["serviceAccountName"], w["metadata"]["namespace"]
        need_by_comp = {component(c): needs(c, w, objs) for c in containers(w)}
        all_needs = set().union(*need_by_comp.values())
        held = grants(objs, sa, ns)
        all_held = set().union(*held.values()) if held else set()
        for n in sorted(all_needs - all_held, key=str):
            problems.append(f"{name_of(w)}: needed but not granted: {n}")
        for g in sorted(all_held - all_needs, key=str):
            problems.append(f"{name_of(w)}: granted but not needed: {g}")
        roles = _roles(objs)
        held_by_comp: dict[str, set] = {}
        for key, rules in held.items():
            owner = roles[key]["metadata"].get("labels", {}).get("lodestone.dev/rbac-for")
            if owner not in need_by_comp:
                problems.append(f"{key}: for {owner!r}, which this pod does not run")
                continue
            held_by_comp.setdefault(owner, set()).update(rules)
            for r in sorted(rules - need_by_comp[owner], key=str):
                problems.append(f"{key} (for {owner}) holds {r}, which {owner} does not need")
        for comp, need in need_by_comp.items():
            for n in sorted(need - held_by_comp.get(comp, set()), key=str):
                problems.append(f"{name_of(w)}: no role for {comp} grants {n}")
        if not all_needs:
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{name_of(w)}: calls no API but mounts a token")
    return problems


@pytest.mark.parametrize("directory", OVERLAYS, ids=ids)
def test_rbac_is_exactly_what_the_components_need(directory):
    problems = rbac_problems(render(directory))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("directory", OVERLAYS, ids=ids)
def test_no_wildcards_and_every_role_is_bound(directory):
    objs = render(directory)
    bound = set()
    for b in objs:
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            bound.add(b["roleRef"]["name"])
    for key, role in _roles(objs).items():
        assert key[2] in bound, f"{key} is bound to nobody"
        for r in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in r[field], f"{key}: wildcard in {field}"


def test_the_check_finds_a_missing_and_an_extra_permission():
    objs = [copy.deepcopy(o) for o in render(ROOT / "deploy" / "lvm" / "overlays" / "cluster")]
    assert rbac_problems(objs) == []
    (resizer,) = [o for o in objs if o["kind"] == "ClusterRole"
                  and o["metadata"]["name"] == "lodestone-lvm-resizer"]
    resizer["rules"][0]["verbs"].remove("patch")  # persistentvolumes patch
    resizer["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]})
    problems = "\n".join(rbac_problems(objs))
    assert "no role for csi-resizer grants ('', 'persistentvolumes', 'patch'" in problems
    assert "granted but not needed: ('', 'secrets', 'list'" in problems
    (snap,) = [o for o in objs if o["kind"] == "ClusterRole"
               and o["metadata"]["name"] == "lodestone-lvm-snapshotter"]
    snap["rules"] = [r for r in snap["rules"] if r["resources"] != ["volumesnapshotclasses"]]
    problems = "\n".join(rbac_problems(objs))
    assert "needed but not granted: ('snapshot.storage.k8s.io', 'volumesnapshotclasses'" in problems
    # a rule moved to another component's role is caught too
    objs = [copy.deepcopy(o) for o in render(ROOT / "deploy" / "lvm" / "overlays" / "cluster")]
    (ctrl,) = [o for o in objs if o["kind"] == "ClusterRole"
               and o["metadata"]["name"] == "lodestone-lvm-controller"]
    ctrl["rules"].append({"apiGroups": [""], "resources": ["events"], "verbs": ["create"]})
    assert "(for lodestone-controller) holds ('', 'events', 'create'" in "\n".join(
        rbac_problems(objs))
