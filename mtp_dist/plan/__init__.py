"""The planner: `python -m mtp_dist.plan CONFIG --gpus N` says whether a config fits, on which
layouts, and how long it trains, before a cluster is booked; `--dry-run` stands up megatron-core's
process groups for the full world in one process (a fake process group) and builds every
(tensor, pipeline) position's stage on the meta device.

- mtp_dist.model.costs: parameters and FLOPs per pipeline stage (the model's own statements);
- memory: per-rank memory terms, each with the formula it uses;
- layouts: the feasible TP x PP x DP x micro-batch layouts, ranked by estimated step time;
- dry_run: the fake-process-group build and the checks of its sharded state dicts;
- __main__: the command.
"""
