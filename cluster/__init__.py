"""Cluster tools: hostfiles, launch wrappers, SLURM scripts and a preflight check. No hyper-parameters here.

    python -m cluster.hostfile     SLURM node list or host list -> DeepSpeed hostfile
    python -m cluster.launch       the DeepSpeed launcher over pdsh/ssh, with the environment the ranks need
    python -m cluster.preflight    GPUs, NCCL, shared file system, shards, same Python everywhere
    cluster/slurm/*.sbatch         pre-training (requeued on preemption/time limit), job arrays
"""
