"""The DeepSpeed engine (engine.py: ZeRO-1/2/3 over megatron-core's tensor parallelism) and its
checkpoint tools (checkpoint.py: universal conversion, export)."""
