#!/usr/bin/env bash
# Install what the two-node test needs to start ranks the way a cluster with a hostfile does: pdsh (DeepSpeed's
# default multi-node launcher), an OpenSSH server to run inside each test node's network namespace, and iproute2.
# Idempotent; needs root and apt. Exits 2 with a reason otherwise, so the test can skip with that reason.
set -euo pipefail

missing=0
for tool in pdsh ssh ssh-keygen /usr/sbin/sshd ip; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 0 ]; then
    echo "pdsh, openssh and iproute2 already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "cannot install pdsh/openssh-server: not root" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install pdsh/openssh-server: no apt-get on this machine" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -qq --no-install-recommends pdsh openssh-server openssh-client iproute2 >/dev/null; }
# The package lists may be missing on a fresh image; refresh them only when the install needs it.
install 2>/dev/null || { apt-get update -qq && install; } \
    || { echo "apt-get install pdsh openssh-server iproute2 failed" >&2; exit 2; }
echo "installed: $(pdsh -V 2>&1 | head -1), $(ssh -V 2>&1)"
