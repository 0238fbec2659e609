"""Launch helpers: a throw-away single-node Slurm for tests and demos (``local_slurm``).

The cluster-facing pieces are shell and NeMo-Run files outside the package: ``slurm/*.sbatch``
and ``examples/nemo_run/``.
"""
