"""The certificate tools of deploy/lvm/certs make what the driver accepts:
certificates that verify for their purpose and name, the controller's Secret
with the keys its Deployment mounts, one directory per node holding that
node's files only (no Secret of node keys), and, when a built lodestone
binary is at hand, a real mutual-TLS handshake between a controller and a
node agent."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from deploylib import DEPLOY, ROOT, load_docs, schema_errors

CERTS = DEPLOY / "lvm" / "certs"
MAKE = CERTS / "make-certs.sh"
NODES_SCRIPT = CERTS / "cert-manager-nodes.sh"


def make_certs(out: Path, *nodes: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(MAKE), str(out), *nodes], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    make_certs(out, "node-b.example.com", "node-a")
    return out


def openssl_verify(pki: Path, cert: Path, purpose: str, name: str) -> bool:
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki / "ca.crt"), "-purpose", purpose,
         "-verify_hostname", name, str(cert)],
        capture_output=True, text=True,
    )
    return proc.returncode == 0


def _node(pki: Path, node: str, file: str = "tls.crt") -> Path:
    return pki / "nodes" / node / file


def test_certificates_verify_for_their_purpose_and_name(pki):
    ctrl = pki / "controller.crt"
    node = _node(pki, "node-a")
    assert openssl_verify(pki, ctrl, "sslclient", "lodestone-controller")
    assert openssl_verify(pki, node, "sslserver", "node-a")
    assert openssl_verify(pki, _node(pki, "node-b.example.com"), "sslserver",
                          "node-b.example.com")
    assert not openssl_verify(pki, node, "sslserver", "node-b.example.com")
    # A node is a client too (it reads snapshots from other nodes), but only
    # under its own name: the agents admit the controller by name.
    assert openssl_verify(pki, node, "sslclient", "node-a")
    assert not openssl_verify(pki, node, "sslclient", "lodestone-controller")
    assert not openssl_verify(pki, ctrl, "sslserver", "lodestone-controller")
    for key in [pki / "controller.key", *sorted((pki / "nodes").glob("*/tls.key")),
                pki / "ca.key"]:
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----"), key  # PKCS#8
        assert (key.stat().st_mode & 0o077) == 0, f"{key} is readable by others"


def _secret(pki: Path, name: str) -> dict:
    (doc,) = load_docs(pki / "secrets" / f"{name}.yaml")
    return doc


def _public_key(path: Path) -> str:
    """The public key of a certificate or a private key, PEM."""
    args = ["x509", "-pubkey", "-noout", "-in"] if path.name.endswith(".crt") else \
        ["pkey", "-pubout", "-in"]
    return subprocess.run(["openssl", *args, str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_only_the_controller_secret_and_one_directory_per_node(pki):
    """The one Secret is the controller's; every node's key is only in that
    node's own directory (copied to that node alone), next to its
    certificate and the CA."""
    assert sorted(p.name for p in (pki / "secrets").iterdir()) == [
        "lodestone-lvm-controller-tls.yaml"]
    ctrl = _secret(pki, "lodestone-lvm-controller-tls")
    assert schema_errors(ctrl) == []
    assert ctrl["metadata"]["namespace"] == "lodestone-lvm"

    def data(s, key):
        return base64.b64decode(s["data"][key])

    assert set(ctrl["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert data(ctrl, "tls.crt") == (pki / "controller.crt").read_bytes()
    assert data(ctrl, "tls.key") == (pki / "controller.key").read_bytes()
    assert data(ctrl, "ca.crt") == (pki / "ca.crt").read_bytes()
    nodes = sorted(p.name for p in (pki / "nodes").iterdir())
    assert nodes == ["node-a", "node-b.example.com"]
    for node in nodes:
        d = pki / "nodes" / node
        assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
        assert (d / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
        assert _public_key(d / "tls.key") == _public_key(d / "tls.crt")
        assert openssl_verify(pki, d / "tls.crt", "sslserver", node)
        for other in nodes:
            if other != node:
                assert not openssl_verify(pki, d / "tls.crt", "sslserver", other)


def test_a_second_run_keeps_the_ca_and_adds_nodes(tmp_path):
    make_certs(tmp_path, "node-a")
    ca = (tmp_path / "ca.crt").read_bytes()
    node_a = _node(tmp_path, "node-a").read_bytes()
    make_certs(tmp_path, "node-a", "node-c")
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert _node(tmp_path, "node-a").read_bytes() == node_a
    assert openssl_verify(tmp_path, _node(tmp_path, "node-c"), "sslserver", "node-c")
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == ["node-a", "node-c"]


def test_the_old_all_nodes_secret_is_removed(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "lodestone-lvm-node-tls.yaml").write_text("old\n")
    proc = make_certs(tmp_path, "node-a")
    assert not (tmp_path / "secrets" / "lodestone-lvm-node-tls.yaml").exists()
    assert "delete secret lodestone-lvm-node-tls" in proc.stderr


@pytest.mark.parametrize("bad", ["Node-A", "node_a", "-node", "a" * 64, "node..a", "../x"])
def test_names_that_cannot_be_node_ids_are_refused(tmp_path, bad):
    proc = make_certs(tmp_path, "node-a", bad, check=False)
    assert proc.returncode != 0 and "not a lowercase DNS name" in proc.stderr
    assert not (tmp_path / "secrets").exists() or not any((tmp_path / "secrets").iterdir())


def _handshake(pki: Path, server_cert: str, client_cert: str, server_name: str) -> str | None:
    """A TLS 1.3 handshake with the agent's rules (server and client
    certificates from the CA, the client's required); None or the error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / f"{server_cert}.crt", pki / f"{server_cert}.key")
    server_ctx.load_verify_locations(pki / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(pki / f"{client_cert}.crt", pki / f"{client_cert}.key")
    client_ctx.load_verify_locations(pki / "ca.crt")
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(f"server: {e}")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_name) as s:
            s.sendall(b"x")
            s.recv(1)  # the server's verdict on our certificate arrives now
    except (ssl.SSLError, OSError) as e:
        errors.append(f"client: {e}")
    finally:
        b.close()
        t.join(5)
    return "; ".join(errors) or None


def test_tls_handshake_between_controller_and_node(pki):
    assert _handshake(pki, "nodes/node-a/tls", "controller", "node-a") is None
    assert "node-a" in (_handshake(pki, "nodes/node-b.example.com/tls", "controller", "node-a")
                        or "")
    # a node's certificate is a client certificate too (a node reads
    # snapshots from another node's agent for cross-node restores): TLS
    # accepts it; the agent then checks the name it carries (the controller
    # for the agent API, a granted node for snapshot reads; see
    # tests/conformance/agent_tls.rs and agent_scope_lvm.rs)
    assert _handshake(pki, "nodes/node-a/tls", "nodes/node-b.example.com/tls", "node-a") \
        is None
    # the controller's certificate is a client certificate only
    assert _handshake(pki, "controller", "nodes/node-a/tls", "lodestone-controller") \
        is not None


def _lodestone_binary() -> Path | None:
    built = [p for p in (ROOT / "target" / "debug" / "lodestone",
                         ROOT / "target" / "release" / "lodestone") if p.exists()]
    return max(built, key=lambda p: p.stat().st_mtime) if built else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, needle: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("served_cert,reachable", [("node-a", True),
                                                   ("node-b.example.com", False)])
def test_the_driver_accepts_these_certificates(pki, tmp_path, served_cert, reachable):
    """lodestone --mode node with a node certificate, and --mode controller
    with the controller's, on loopback: the controller reaches the agent of
    node-a only when node-a's certificate is served."""
    binary = _lodestone_binary()
    if binary is None:
        pytest.skip("no built lodestone binary (cargo build) for the real handshake")
    port = _free_port()
    common = [str(binary), "--driver", "lvm", "--device-class", "thin=vg-none/pool0",
              "--tls-ca", str(pki / "ca.crt")]
    env = {**os.environ, "RUST_LOG": "info", "LODESTONE_LVM_REFRESH_SECONDS": "0"}
    procs = []
    try:
        node_log = tmp_path / "node.log"
        with open(node_log, "w") as log:
            procs.append(subprocess.Popen(
                common + ["--mode", "node", "--node-id", "node-a",
                          "--endpoint", f"unix://{tmp_path}/node.sock",
                          "--agent-listen", f"127.0.0.1:{port}",
                          "--tls-cert", str(_node(pki, served_cert, "tls.crt")),
                          "--tls-key", str(_node(pki, served_cert, "tls.key"))],
                stdout=log, stderr=subprocess.STDOUT, env=env))
        assert _wait_for(node_log, "serving the LVM agent API", 10), node_log.read_text()
        ctl_log = tmp_path / "controller.log"
        with open(ctl_log, "w") as log:
            procs.append(subprocess.Popen(
                common + ["--mode", "controller", "--agent", f"node-a=127.0.0.1:{port}",
                          "--endpoint", f"unix://{tmp_path}/controller.sock",
                          "--tls-cert", str(pki / "controller.crt"),
                          "--tls-key", str(pki / "controller.key")],
                stdout=log, stderr=subprocess.STDOUT, env=env))
        if reachable:
            assert _wait_for(ctl_log, "node inventory received node=node-a", 15), ctl_log.read_text()
        else:
            assert _wait_for(ctl_log, 'certificate not valid for name "node-a"', 15), (
                ctl_log.read_text())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


FAKE_KUBECTL = """#!/usr/bin/env bash
# Stands in for kubectl: two nodes; node-a's Secret is issued, node-b's is not.
case "$*" in
  "get nodes -o jsonpath="*) printf 'node-a\\nnode-b\\n' ;;
  *"get secret lodestone-lvm-node-node-a -o jsonpath={.data.ca\\.crt}") printf 'Q0E=' ;;
  *"get secret lodestone-lvm-node-node-a -o jsonpath={.data.tls\\.crt}") printf 'Q1JU' ;;
  *"get secret lodestone-lvm-node-node-a -o jsonpath={.data.tls\\.key}") printf 'S0VZ' ;;
  *"get secret lodestone-lvm-node-node-b -o jsonpath="*) printf '' ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_kubectl(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _nodes_script(env, *args):
    return subprocess.run(["bash", str(NODES_SCRIPT), *args], capture_output=True, text=True,
                          env=env)


def test_cert_manager_node_certificates(fake_kubectl):
    proc = _nodes_script(fake_kubectl, "certificates")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert [d["spec"]["dnsNames"] for d in docs] == [["node-a"], ["node-b"]]
    for d in docs:
        assert schema_errors(d) == [], d
        assert d["spec"]["issuerRef"]["name"] == "lodestone-lvm-ca"
        assert d["spec"]["usages"] == ["digital signature", "server auth", "client auth"]
    issuers = load_docs(CERTS / "cert-manager" / "ca.yaml")
    assert "lodestone-lvm-ca" in {i["metadata"]["name"] for i in issuers if i["kind"] == "Issuer"}


def test_cert_manager_export(fake_kubectl, tmp_path):
    """`export` writes one node's files, from that node's Secret only, for
    copying to that node; nothing is written for a node not issued yet."""
    out = tmp_path / "node-a"
    proc = _nodes_script(fake_kubectl, "export", "node-a", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        "ca.crt": b"CA", "tls.crt": b"CRT", "tls.key": b"KEY"}
    assert all((p.stat().st_mode & 0o077) == 0 for p in out.iterdir())
    assert proc.stdout == ""
    out_b = tmp_path / "node-b"
    proc = _nodes_script(fake_kubectl, "export", "node-b", str(out_b))
    assert proc.returncode != 0 and "lodestone-lvm-node-node-b" in proc.stderr
    assert not out_b.exists()
    proc = _nodes_script(fake_kubectl, "bundle")
    assert proc.returncode != 0 and proc.stdout == ""
