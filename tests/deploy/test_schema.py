"""Every object the deployment renders, and every example manifest, fits
the Kubernetes schemas (strict: an unknown or misspelt field fails) of the
oldest and the newest Kubernetes we support; custom resources fit the
schemas in schemas/."""

import pytest

from deploylib import DEPLOY, kustomizations, load_docs, name_of, rel, render, schema_errors

ALL = kustomizations()
EXAMPLES = sorted((DEPLOY / "rbd" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("directory", ALL, ids=[rel(d) for d in ALL])
def test_rendered_objects_fit_their_schemas(directory):
    problems = {name_of(o): schema_errors(o) for o in render(directory)}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, "\n".join(f"{k}: {e}" for k, v in problems.items() for e in v)


@pytest.mark.parametrize("path", EXAMPLES, ids=[rel(p) for p in EXAMPLES])
def test_examples_fit_their_schemas(path):
    for obj in load_docs(path):
        assert schema_errors(obj) == [], name_of(obj)


def test_the_validator_rejects_what_it_should():
    """The checks above would catch a misspelt field, a wrong type, or a
    custom resource without a schema."""
    ds = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}},
    }
    assert any("volumeMount" in e for e in schema_errors(ds))
    ds["spec"]["template"]["spec"]["containers"][0] = {"name": "c", "image": "i", "args": "x"}
    assert schema_errors(ds)
    vsc = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "x"}, "driver": "d", "deletionPolicy": "Keep"}
    assert schema_errors(vsc)
    assert schema_errors({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}})
