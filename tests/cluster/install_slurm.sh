#!/usr/bin/env bash
# Install a single-node SLURM (Debian slurm-wlm + munge) if it is not there yet. Idempotent: does nothing when the
# daemons and client tools are already installed. Needs root and apt (Debian/Ubuntu); exits 2 with a reason otherwise,
# so the test fixture can skip with that reason instead of failing.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol sacct munged)
missing=0
for tool in "${need[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "slurm-wlm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "cannot install slurm-wlm/munge: not root" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install slurm-wlm/munge: no apt-get on this machine" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
# slurm-wlm pulls in slurmctld, slurmd and the client tools. No slurmdbd: the tests ask scontrol, not sacct.
apt-get update -qq || { echo "apt-get update failed" >&2; exit 2; }
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || { echo "apt-get install slurm-wlm munge failed" >&2; exit 2; }
echo "installed: $(sinfo --version 2>/dev/null || echo slurm), $(munged --version 2>&1 | head -1)"
