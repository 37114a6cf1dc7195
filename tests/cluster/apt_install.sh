#!/usr/bin/env bash
# Install Debian packages for a test fixture unless the tools it needs are there already. Idempotent; needs root and
# apt. Exits 2 with a reason otherwise, so the fixture can skip with that reason instead of failing.
#   apt_install.sh TOOL... -- PACKAGE...     (a TOOL is a command name or an absolute path)
set -euo pipefail

tools=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tools+=("$1"); shift; done
shift || true
packages=("$@")
missing=0
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "already installed: ${packages[*]}"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "cannot install ${packages[*]}: not root" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install ${packages[*]}: no apt-get on this machine" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
# The package lists may be missing on a fresh image; refresh them only when the install needs it.
install 2>/dev/null || { apt-get update -qq && install; } || { echo "apt-get install ${packages[*]} failed" >&2; exit 2; }
echo "installed: ${packages[*]}"
