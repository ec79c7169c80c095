#!/usr/bin/env bash
# Install Debian's chromium when it is missing (root on Debian/Ubuntu); otherwise say how.
# The run page's browser test drives it through playwright, which downloads no browser.
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  exit 0
fi
echo "chromium is not installed: install it (e.g. 'sudo apt-get install chromium')" \
  "or point CHROMIUM_PATH at a Chromium binary." >&2
exit 1
