#!/bin/bash
# shardgrad on a SLURM cluster: Open MPI's mpirun reads the allocation and starts one rank per
# task through srun; every rank runs `shardgrad train` with parallel.dp = the number of tasks.
#
#   sbatch --nodes=2 --ntasks-per-node=2 --cpus-per-task=4 cluster/slurm.sh \
#       examples/digits_mlp.toml [--set KEY=VALUE]...
#
# Runs go to runs/slurm-<job id> (rank 0 writes; a shared filesystem is assumed). The same
# Python, with shardgrad installed (pip install -e ".[mpi]"), must be first on PATH on every
# node. MPIRUN replaces the mpirun command: MPIRUN="mpirun --bind-to core" adds options,
# MPIRUN='printf %s\n' prints the command line, one word a line, instead of running it.
#SBATCH --job-name=shardgrad
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

config=${1:?usage: sbatch cluster/slurm.sh CONFIG [--set KEY=VALUE]...}
shift
export SHARDGRAD_PROGRESS=0
exec ${MPIRUN:-mpirun} -n "$SLURM_NTASKS" -x SHARDGRAD_PROGRESS \
    python -m shardgrad train "$config" --out "runs/slurm-$SLURM_JOB_ID" \
    --set parallel.dp="$SLURM_NTASKS" --set device.threads="${SLURM_CPUS_PER_TASK:-1}" "$@"
