import sys

from mtp_dist.evaluate.cli import main

sys.exit(main())
