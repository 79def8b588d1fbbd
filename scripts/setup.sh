#!/usr/bin/env bash
# Set up everything the portal (and, with --test, its test suite) needs on a fresh machine:
# Debian packages, a Python 3.11 virtual environment in .venv, the project and its pins.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# git: configs are exported to Git; chromium + fonts: the browser tests (playwright drives
# Debian's chromium; `playwright install` downloads its own build and cannot work offline).
apt_install git
if ((WANT_TEST)); then
  # postgresql: the tests run the same code on a real PostgreSQL server they start themselves
  apt_install chromium fonts-dejavu-core postgresql
  # kubectl renders deploy/ with its built-in kustomize in the tests. Debian's kubernetes-client is
  # old (kubectl 1.20, kustomize v2.0.3): the kustomizations are written for it and for v5 alike.
  command -v kubectl >/dev/null || apt_install kubernetes-client
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [[ -z "$PYTHON" ]]; then
  apt_install python3.11 python3.11-venv
  PYTHON=python3.11
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi

extras=""
((WANT_TEST)) && extras="[test]"
stamp=".venv/.installed${extras}"
fingerprint="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$fingerprint" ]]; then
  echo "setup: installing the project into .venv (first time: a few minutes, ~6 GB with torch)"
  .venv/bin/python -m pip install -q --upgrade pip wheel
  .venv/bin/python -m pip install -q -e ".${extras}"
  echo "$fingerprint" > "$stamp"
fi
