#!/usr/bin/env bash
# System packages beyond pip, from Debian (bookworm names):
# - Chromium and its driver, for the demo app's browser test (tests/test_app.py drives /usr/bin/chromium
#   through /usr/bin/chromedriver; no browser is ever downloaded at run time);
# - the font families whose glyphs are the quality lab II data (diffusers_ext/lab/data.py, FONT_DIRS).
# Run as root, or as a user with sudo. Idempotent: installs only what is missing.
set -euo pipefail

PACKAGES=(chromium chromium-driver
          fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-liberation2 fonts-freefont-ttf
          fonts-noto-core fonts-urw-base35)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    echo "setup.sh: no apt-get here: install Chromium and chromedriver (or set CHROMIUM and CHROMEDRIVER;" \
         "without them the browser tests are skipped) and the fonts of: ${PACKAGES[*]:2}" >&2
    exit 0
fi
MISSING=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || MISSING+=("$package")
done
if [ "${#MISSING[@]}" -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}"
