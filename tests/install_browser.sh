#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser test (tests/test_dashboard.py), once:
# it does nothing when the browser is already there. The test's session fixture runs it, so a
# fresh machine or CI needs no other step; `make test` may also run it up front.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_browser.sh: $CHROMIUM is missing; run as root (or with sudo) to install it." >&2
    exit 1
  fi
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent or stale on a new machine.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
test -x "$CHROMIUM"
echo "installed $("$CHROMIUM" --version 2>/dev/null)"
