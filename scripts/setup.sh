#!/usr/bin/env bash
# Set up everything pacs-triage needs on a fresh Debian/Ubuntu machine:
# system packages (dcmtk, Orthanc, dicom3tools, Chromium) and a virtual environment.
# Idempotent: a second run installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: installing ${need_apt[*]} with apt-get"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
# The orthanc package starts a system service on install; tests and benchmarks
# start their own Orthanc on loopback, so stop the system one.
if pgrep -x Orthanc >/dev/null 2>&1 && [ -f /etc/init.d/orthanc ]; then
  /etc/init.d/orthanc stop >/dev/null 2>&1 || pkill -x Orthanc || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.pacs-triage-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the CPU build of 2.13.0 is on local disk; anything
  # unpinned would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
