import sys

from mtp_dist.compat import ignore_known_warnings

ignore_known_warnings()  # before megatron-core and DeepSpeed are imported
from mtp_dist.engines.deepspeed.checkpoint import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
