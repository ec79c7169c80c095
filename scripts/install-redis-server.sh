#!/usr/bin/env bash
# Install Debian's redis-server when it is missing (root on Debian/Ubuntu); otherwise say how.
set -euo pipefail
if command -v redis-server >/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  exit 0
fi
echo "redis-server is not installed: install it (e.g. 'sudo apt-get install redis-server')" \
  "or point HAPO_REDIS_URL at a running Redis." >&2
exit 1
