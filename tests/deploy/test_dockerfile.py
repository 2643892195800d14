"""The image has exactly the programs the driver runs: the programs named at
the `Cmd::new("...")` call sites in src/ (outside tests) map to Debian
packages, each of which the Dockerfile's runtime stage installs, and the
runtime stage installs nothing else but the libraries the `rbd` feature
links. No container engine runs here, so the Dockerfile is checked
statically."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from deploylib import DEPLOY, ROOT, component, containers, flag, render, workloads

DOCKERFILE = ROOT / "Dockerfile"
LVM_CONF = DEPLOY / "image" / "lvm.conf"

# program -> the Debian (bookworm) packages it needs in the image.
PROGRAMS = {
    # lvm runs thin_check / thin_repair / thin_dump when it activates or
    # repairs thin pools (lvm2 only recommends the package).
    "lvm": {"lvm2", "thin-provisioning-tools"},
    # block maps of thin snapshots: the pool's metadata snapshot, read
    "dmsetup": {"dmsetup"},
    "thin_dump": {"thin-provisioning-tools"},
    "thin_delta": {"thin-provisioning-tools"},
    "blkid": {"util-linux"},
    "mkfs.ext4": {"e2fsprogs"},
    "resize2fs": {"e2fsprogs"},
    "mkfs.xfs": {"xfsprogs"},
    "xfs_growfs": {"xfsprogs"},
    "mkfs.btrfs": {"btrfs-progs"},
    "btrfs": {"btrfs-progs"},
    "losetup": {"mount"},  # `lodestone demo`
    # krbd map/unmap; rbd loads the kernel module with modprobe if needed.
    "rbd": {"ceph-common", "kmod"},
}

# Programs not called from src/ yet that the image must still carry (none:
# rbd-nbd is deliberately not offered, see src/rbd/node.rs).
PENDING_PROGRAMS: dict = {}

# Libraries, not programs, that the rbd controller loads at run time
# (a `const LIB...: &CStr = c"lib....so.N"` in src/) -> runtime package. Nothing is
# linked at build time, so the build stage needs no -dev package for them.
LINKED = {"librados.so.2": "librados2", "librbd.so.1": "librbd1"}

BUILD_TOOLS = re.compile(
    r"^(gcc|g\+\+|clang|make|cmake|build-essential|pkg-config|cargo|rustc|protobuf-compiler"
    r"|.*-dev)$"
)


def strip_test_modules(text: str) -> str:
    """The source without `#[cfg(test)] mod ... { ... }` blocks."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub\s+)?mod\s+\w+\s*\{", text):
        if m.start() < pos:
            continue
        out.append(text[pos : m.start()])
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


def called_programs() -> dict[str, list[str]]:
    """program -> the files that run it."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src").rglob("*.rs")):
        text = strip_test_modules(path.read_text())
        for m in re.finditer(r"Cmd::new\(\s*([^)]*?)\s*\)", text):
            arg = m.group(1)
            literal = re.fullmatch(r'"([^"]+)"', arg)
            assert literal, (
                f"{path.relative_to(ROOT)}: Cmd::new({arg}) does not name its program "
                "literally; this test cannot tell which package it needs"
            )
            found.setdefault(literal.group(1), []).append(str(path.relative_to(ROOT)))
    return found


def dockerfile_stages() -> list[dict]:
    """Each stage: its FROM line, name, and joined instructions."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append({"from": m.group(1), "name": m.group(2), "lines": []})
        elif stages:
            stages[-1]["lines"].append((word.upper(), rest.strip()))
    return stages


def apt_packages(stage: dict) -> set[str]:
    pkgs = set()
    for word, rest in stage["lines"]:
        if word != "RUN":
            continue
        for cmd in re.split(r"&&|;", rest):
            tokens = cmd.split()
            if "apt-get" in tokens and "install" in tokens:
                after = tokens[tokens.index("install") + 1 :]
                pkgs |= {t for t in after if not t.startswith("-")}
    return pkgs


def runtime_stage() -> dict:
    return dockerfile_stages()[-1]


def build_stage() -> dict:
    (stage,) = [s for s in dockerfile_stages() if s["name"] == "build"]
    return stage


def test_program_scan_finds_the_known_call_sites():
    found = called_programs()
    assert {"lvm", "blkid", "mkfs.ext4", "xfs_growfs", "btrfs"} <= set(found)
    # runner.rs tests run sh, echo and sleep: test modules are left out
    assert not {"sh", "echo", "sleep"} & set(found)


def test_every_called_program_is_in_the_image():
    found = called_programs()
    unknown = set(found) - set(PROGRAMS) - set(PENDING_PROGRAMS)
    assert not unknown, (
        f"{ {p: found[p] for p in unknown} } run programs this test has no package for: "
        "add them to PROGRAMS and the Dockerfile's runtime stage"
    )
    installed = apt_packages(runtime_stage())
    for program in set(found) | set(PENDING_PROGRAMS):
        pkgs = PROGRAMS.get(program) or PENDING_PROGRAMS[program]
        missing = pkgs - installed
        assert not missing, f"{program} needs {missing}, not installed in the runtime stage"


def test_the_image_installs_nothing_that_is_not_used():
    needed = set()
    for program in set(called_programs()) | set(PENDING_PROGRAMS):
        needed |= PROGRAMS.get(program) or PENDING_PROGRAMS[program]
    libraries = set(LINKED.values())
    extra = apt_packages(runtime_stage()) - needed - libraries
    assert not extra, f"the runtime stage installs {extra}, which nothing runs"


def test_loaded_libraries_are_shipped_and_nothing_is_linked():
    loads, links = set(), set()
    for path in (ROOT / "src").rglob("*.rs"):
        text = strip_test_modules(path.read_text())
        loads |= set(re.findall(r'const LIB\w*: &CStr = c"(lib[\w.+-]+\.so\.\d+)"', text))
        links |= set(re.findall(r'#\[link\(name\s*=\s*"([^"]+)"', text))
    assert loads == set(LINKED), f"update LINKED for {loads}"
    assert not links, f"linked at build time: {links}; the node plugin must not map them"
    assert set(LINKED.values()) <= apt_packages(runtime_stage())
    runs = " ".join(rest for word, rest in build_stage()["lines"] if word == "RUN")
    assert re.search(r"cargo build .*--features rbd", runs), "the image must build the rbd feature"
    assert "--locked" in runs and "--release" in runs


def test_no_build_tools_in_the_runtime_image():
    stage = runtime_stage()
    tools = {p for p in apt_packages(stage) if BUILD_TOOLS.match(p)}
    assert not tools, tools
    copies = [rest for word, rest in stage["lines"] if word == "COPY"]
    from_build = [c for c in copies if c.startswith("--from=")]
    assert from_build == ["--from=build /out/lodestone /usr/local/bin/lodestone"], from_build
    for word, rest in stage["lines"]:
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest
            assert "rm -rf /var/lib/apt/lists/*" in rest


def test_entrypoint_labels_and_base():
    stages = dockerfile_stages()
    stage = stages[-1]
    (entry,) = [rest for word, rest in stage["lines"] if word == "ENTRYPOINT"]
    assert json.loads(entry) == ["/usr/local/bin/lodestone"], "exec form, the copied binary"
    labels = " ".join(rest for word, rest in stage["lines"] if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    license_ = re.search(r'^license\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert f'org.opencontainers.image.licenses="{license_.group(1)}"' in labels
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG DEBIAN_RELEASE=bookworm$", text, re.M), (
        "the image's packages are the bookworm ones the guest tests use"
    )
    assert stages[-1]["from"] == "debian:${DEBIAN_RELEASE}-slim"
    assert build_stage()["from"].endswith("-${DEBIAN_RELEASE}")


def test_the_build_context_has_every_target_cargo_names():
    """Cargo.toml names some targets explicitly; cargo refuses to build when
    their files are missing, so the build stage must copy them."""
    copied = set()
    for word, rest in build_stage()["lines"]:
        if word == "COPY":
            copied |= set(rest.split()[:-1])
    cargo = (ROOT / "Cargo.toml").read_text()
    for path in re.findall(r'^path\s*=\s*"([^"]+)"', cargo, re.M):
        assert path.split("/")[0] in copied, f"{path} is not copied into the build stage"
    for name in re.findall(r'^\[\[bench\]\]\s*\nname\s*=\s*"([^"]+)"', cargo, re.M):
        assert "benches" in copied, f"bench {name} needs benches/ in the build stage"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for source in copied | {"deploy/image/lvm.conf"}:
        assert (ROOT / source).exists(), source
        assert not any(source.startswith(i.rstrip("/")) for i in ignore), source


def test_image_tools_are_the_ones_the_guest_tests_use():
    """The real-kernel tests run on the same Debian packages the image ships."""
    out = subprocess.run(
        ["bash", str(ROOT / "tests" / "vm" / "host-packages.sh"), "--with-ceph", "--print"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    tools = apt_packages(runtime_stage()) - set(LINKED.values())
    assert tools <= set(out), f"not installed by the guest tests: {tools - set(out)}"


def _lvm_conf() -> dict[str, str]:
    settings, section = {}, None
    for line in LVM_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith("{"):
            section = line[:-1].strip()
        elif line == "}":
            section = None
        elif "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            settings[f"{section}/{key}"] = value.strip('"')
    return settings


def test_lvm_conf_works_without_udev_and_on_the_hosts_directories():
    conf = _lvm_conf()
    assert conf["activation/udev_sync"] == "0" and conf["activation/udev_rules"] == "0"
    assert conf["devices/obtain_device_list_from_udev"] == "0"
    assert conf["activation/monitoring"] == "0" and conf["global/use_lvmpolld"] == "0"
    assert "COPY deploy/image/lvm.conf /etc/lvm/lvm.conf" in DOCKERFILE.read_text()
    # the node plugins mount the host's directories where this file points
    host_dirs = {conf["global/locking_dir"], conf["backup/backup_dir"],
                 conf["backup/archive_dir"], "/run/lvm"}
    for overlay in ("cluster", "single-node"):
        for w in workloads(render(DEPLOY / "lvm" / "overlays" / overlay)):
            if w["kind"] != "DaemonSet":
                continue
            spec = w["spec"]["template"]["spec"]
            host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
            (driver,) = [c for c in containers(w) if component(c).startswith("lodestone")]
            mounted = {host[m["name"]]: m["mountPath"] for m in driver["volumeMounts"]
                       if m["name"] in host}
            for d in host_dirs:
                assert mounted.get(d) == d, f"{overlay}: host {d} not mounted at {d}"
            assert flag(driver, "lvm-udev") is None


def test_lvm_conf_is_valid_for_lvm(tmp_path):
    lvmconfig = shutil.which("lvmconfig") or shutil.which("lvmconfig", path="/usr/sbin:/sbin")
    if not lvmconfig:
        pytest.skip("lvmconfig (lvm2) is not installed here")
    (tmp_path / "lvm.conf").write_text(LVM_CONF.read_text())
    proc = subprocess.run(
        [lvmconfig, "--validate"], capture_output=True, text=True,
        env={"LVM_SYSTEM_DIR": str(tmp_path), "LVM_SUPPRESS_FD_WARNINGS": "1",
             "PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stdout + proc.stderr
