#!/usr/bin/env bash
# A single-node SLURM (Debian slurm-wlm + munge). slurm-wlm pulls in slurmctld, slurmd and the client tools. No
# slurmdbd: the tests ask scontrol, not sacct.
exec bash "$(dirname "$0")/apt_install.sh" slurmctld slurmd sbatch srun scontrol sacct munged -- slurm-wlm munge
