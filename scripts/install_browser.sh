#!/usr/bin/env bash
# Installs Debian's headless browser for the dashboard test (tests/integration/test_dashboard.py):
# chromium and its chromedriver, from apt, only when they are missing. The browser
# comes from the distribution, never from a package that downloads one at run time.
# Needs root (or sudo) the first time; a machine that has both does nothing.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "chromium and chromedriver: present ($(chromium --version 2>/dev/null | head -1))"
    exit 0
fi
if ! have apt-get; then
    echo "error: chromium/chromedriver missing and no apt-get here; install Debian's chromium and" \
         "chromium-driver (or your distribution's) by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    have sudo || { echo "error: installing chromium needs root (or sudo)" >&2; exit 1; }
    SUDO="sudo"
fi
echo "== installing chromium and chromium-driver (apt)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "chromium and chromedriver: installed ($(chromium --version 2>/dev/null | head -1))"
