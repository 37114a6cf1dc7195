#!/usr/bin/env bash
# Set up a fresh machine for ds-pld (idempotent; seconds when already done).
#   bash launch/setup_env.sh          # the library, DeepSpeed, transformers, W&B, ...
#   bash launch/setup_env.sh test     # plus the test tools (pytest, mpich, triton) and, as root, SLURM + munge,
#                                     # pdsh + sshd (the two-node test)
# torch is installed first and pinned when missing, so pip never resolves an unpinned torch to a multi-GB CUDA build;
# a machine that already has torch (a GPU cluster image) keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${DS_PLD_TORCH_VERSION:-2.13.0}"
fi
if [ "${1:-}" = "test" ]; then
  "$PY" -m pip install -q -e ".[all,test,triton]"
  if [ -x tests/cluster/install_slurm.sh ] && [ "$(id -u)" = 0 ]; then
    bash tests/cluster/install_slurm.sh || echo "setup_env: SLURM packages not installed; SLURM tests will skip" >&2
  fi
  if [ -x tests/cluster/install_ssh.sh ] && [ "$(id -u)" = 0 ]; then
    bash tests/cluster/install_ssh.sh || echo "setup_env: pdsh/sshd not installed; the two-node test will skip" >&2
  fi
else
  "$PY" -m pip install -q -e ".[all]"
fi
