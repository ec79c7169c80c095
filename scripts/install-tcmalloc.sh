#!/usr/bin/env bash
# Install tcmalloc when it is missing (root on Debian/Ubuntu); otherwise say how. Optional:
# runtime.allocator=auto runs on the C library's malloc without it, slower on CPU.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null && exit 0
fi
echo "tcmalloc is not installed (e.g. 'sudo apt-get install libtcmalloc-minimal4'): the" \
  "services run on the C library's malloc, and CPU training is slower." >&2
