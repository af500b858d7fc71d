"""mtp-dist: multi-token prediction pretraining on megatron-core and DeepSpeed."""

from mtp_dist.compat import startup

startup.install()  # before anything imports megatron-core (mtp_dist/compat/startup.py)
