"""`python launch/train.py ...` is `python -m mtp_dist.train ...`, for launchers that take a
script path and not a module (DeepSpeed's `--launcher slurm` runs `srun python -u SCRIPT`)."""

import sys

from mtp_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
