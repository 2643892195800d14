#!/usr/bin/env bash
# The layering check: fails when a lower layer of the crate imports an
# upper one. Layers, top to bottom:
#
#   main                          the binary: anything
#   ctl, demo                     operator client and demo, on top
#   server                        wiring of a process's services
#   driver                        the CSI gRPC services
#   core                          backend-neutral logic
#   lvm, rbd                      the backends
#   runner, error, host, failpoint  external programs, syscalls, errors
#
# (config, kube, tls, client and metrics sit beside these; the rules below
# say what each may not import.) Every `crate::NAME` and `$crate::NAME`
# path in src/ counts, grouped ones (`crate::{a, b}`) and `super::` chains
# that climb to the crate root included; comments do not.
#
#   scripts/check-layers.sh              self-test, then check src/
#   scripts/check-layers.sh --root DIR   check DIR/src only
#   scripts/check-layers.sh --self-test  self-test only
set -euo pipefail
cd "$(dirname "$0")/.."

check() {
  python3 - "$1" <<'PY'
import os
import re
import sys

root = sys.argv[1]
src = os.path.join(root, "src")

BACKENDS = {"lvm", "rbd"}
ON_TOP = {"ctl", "demo"}
LOW = {"runner", "error", "host", "failpoint", "core"}
# (who, what they may not import, why)
RULES = [
    (LOW, BACKENDS | {"metrics", "server", "driver"} | ON_TOP,
     "runner, error, host, failpoint and core import no backend, metrics, "
     "server, driver, ctl or demo"),
    ({"driver"}, BACKENDS, "driver imports no backend"),
    (BACKENDS, {"driver", "server"} | ON_TOP,
     "backends import no driver, server, ctl or demo"),
    ({"metrics"}, BACKENDS | {"server"} | ON_TOP,
     "metrics imports no backend, server, ctl or demo"),
    ({"config"}, {"ctl"}, "config imports no ctl"),
]
# Nothing but main and ctl/demo themselves imports ctl or demo.
ALLOWED_ON_TOP = {"main", "ctl", "demo"}


def strip_comments(text):
    """Blanks comments and the text of string and char literals (neither
    imports anything), keeping line breaks."""
    lines = lambda t: "\n" * t.count("\n")
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif re.match(r"b?r#*\"", text[i:i + 40]) and not re.match(r"\w", text[i - 1:i]):
            m = re.match(r"b?r(#*)\"", text[i:])
            end = text.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + lines(text[i:end]))
            i = end
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:i + 4])
            out.append("' '")
            i += m.end()
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + lines(text[i:j + 1]))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_path(rel):
    """src-relative file path -> module path (["core", "node"])."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1] if parts[-1] != "main" else ["main"]
    return parts


def top_modules():
    lib = open(os.path.join(src, "lib.rs")).read()
    names = set(re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)", lib, re.M))
    return names


def group_heads(body):
    """`a::x, b, c::{d}` -> [a, b, c] (top level of one brace group)."""
    heads, depth, item = [], 0, ""
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            m = re.match(r"\s*(\w+)", item)
            if m:
                heads.append(m.group(1))
            item = ""
        else:
            item += ch
    return heads


def imports(text, here):
    """(line, top module) of every path into the crate."""
    found = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1
    for m in re.finditer(r"(?<![\w:])\$?crate\s*::\s*(\{|\w+)", text):
        if m.group(1) == "{":
            start, depth, j = m.end(), 1, m.end()
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            for h in group_heads(text[start:j - 1]):
                found.append((line_of(m.start()), h))
        else:
            found.append((line_of(m.start()), m.group(1)))
    for m in re.finditer(r"(?<![\w:])((?:super\s*::\s*)+)(\w+)", text):
        ups = m.group(1).count("super")
        if ups == len(here) and here:
            found.append((line_of(m.start()), m.group(2)))
    return found


def check():
    tops = top_modules() | {"main"}
    problems = []
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)
            here = module_path(rel)
            who = here[0] if here else "lib"
            text = strip_comments(open(path, encoding="utf-8").read())
            for line, target in imports(text, here):
                if target not in tops or target == who:
                    continue
                where = f"{os.path.relpath(path, root)}:{line}"
                if target in ON_TOP and who not in ALLOWED_ON_TOP:
                    problems.append(f"{where}: {who} imports {target} "
                                    "(nothing but main, ctl and demo imports ctl or demo)")
                    continue
                for whos, banned, why in RULES:
                    if who in whos and target in banned:
                        problems.append(f"{where}: {who} imports {target} ({why})")
    for p in sorted(set(problems)):
        print(p)
    if problems:
        print(f"layer check: {len(set(problems))} upward import(s)", file=sys.stderr)
        return 1
    return 0


sys.exit(check())
PY
}

# Builds a small crate in a temporary directory and checks that the checker
# passes it clean and flags each kind of upward import in it.
self_test() {
  local dir out
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  mkdir -p "$dir/src/core" "$dir/src/lvm" "$dir/src/ctl"
  printf 'pub mod core;\npub mod lvm;\npub mod ctl;\npub mod config;\npub mod driver;\n' \
    >"$dir/src/lib.rs"
  cat >"$dir/src/core/mod.rs" <<'RS'
//! Refers to [`crate::lvm`] in a comment only.
pub mod node;
use crate::core::node::X; /* crate::driver in a comment */
const S: &str = "crate::ctl in a string";
const R: &str = r#"crate::lvm in a "raw" string"#;
const C: char = '"'; // crate::driver
RS
  printf 'pub struct X;\n' >"$dir/src/core/node.rs"
  printf 'use crate::core::node::X;\n' >"$dir/src/lvm/mod.rs"
  printf 'use crate::{config, core};\n' >"$dir/src/ctl/mod.rs"
  printf 'pub const A: u8 = 1;\n' >"$dir/src/config.rs"
  printf 'use crate::core;\n' >"$dir/src/driver.rs"
  printf 'use lodestone::ctl;\n' >"$dir/src/main.rs"
  check "$dir" || { echo "self-test: a clean crate was flagged" >&2; return 1; }

  local -a cases=(
    "src/core/node.rs|use crate::lvm::Thing;|core imports lvm"
    "src/core/node.rs|use crate::{error, driver::X};|core imports driver"
    "src/core/node.rs|use super::super::lvm::Thing;|core imports lvm"
    "src/lvm/mod.rs|fn f() { crate::driver::go() }|lvm imports driver"
    "src/driver.rs|use crate::lvm;|driver imports lvm"
    "src/config.rs|use crate::ctl::Args;|config imports ctl"
    "src/driver.rs|use crate::ctl::Args;|driver imports ctl"
  )
  local case file code want
  for case in "${cases[@]}"; do
    IFS='|' read -r file code want <<<"$case"
    cp "$dir/$file" "$dir/$file.orig"
    printf '%s\n' "$code" >>"$dir/$file"
    if out=$(check "$dir" 2>&1); then
      echo "self-test: not flagged: $code in $file" >&2
      return 1
    fi
    grep -qF "$want" <<<"$out" || { echo "self-test: $code: wrong report: $out" >&2; return 1; }
    mv "$dir/$file.orig" "$dir/$file"
  done
  echo "layer check self-test: ${#cases[@]} upward imports flagged, a clean crate passes"
}

case "${1:-}" in
  --self-test) self_test ;;
  --root) check "$2" ;;
  "") self_test && check . && echo "layer check: no upward imports" ;;
  *) echo "usage: $0 [--self-test | --root DIR]" >&2; exit 2 ;;
esac
