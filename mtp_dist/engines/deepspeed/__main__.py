import sys

from mtp_dist.engines.deepspeed.checkpoint import main

main(sys.argv[1:])
