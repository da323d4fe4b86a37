#!/usr/bin/env bash
# System packages the test suite needs beyond pip: Debian's Chromium and its driver, for the demo
# app's browser test (tests/test_app.py drives /usr/bin/chromium through /usr/bin/chromedriver; no
# browser is ever downloaded at run time). Run as root, or as a user with sudo. Idempotent.
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "setup.sh: no apt-get here: install Chromium and chromedriver yourself (or set CHROMIUM and" \
         "CHROMEDRIVER); without them the browser tests are skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
