#!/usr/bin/env bash
# Multi-host data-parallel training on SLURM: one process per node, every local GPU used.
# jax.distributed.initialize() reads the SLURM environment; each process loads its own data shard.
#
#   sbatch launch/slurm_train.sh configs/three_center.py:paper runs/three_center_paper
#
#SBATCH --job-name=dualseg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
set -euo pipefail
config=${1:-configs/three_center.py:paper}
workdir=${2:-runs/three_center_paper}
# SIGTERM 5 minutes before the time limit: the run saves a checkpoint; resubmit to resume.
srun python -m launch.train --config="$config" --workdir="$workdir" \
  --config.data.num_workers="${DATA_WORKERS:-8}"
