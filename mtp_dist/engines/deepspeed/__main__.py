import sys

from mtp_dist.compat import ignore_known_warnings

# Before the checkpoint tools' imports: megatron-core warns about Apex while being imported.
ignore_known_warnings()

from mtp_dist.engines.deepspeed.checkpoint import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
