import sys

from mtp_dist.engines.deepspeed.checkpoint import main

sys.exit(main(sys.argv[1:]))
