"""mtp-dist: multi-token prediction pretraining on megatron-core and DeepSpeed."""
