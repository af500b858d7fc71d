"""`python -m mtp_dist.plan CONFIG --gpus N [key=value ...]`: parameters (exact), memory per rank
term by term, and the feasible layouts ranked by estimated step time, with tokens per day and
days for the config's token budget. `--json` prints the same as one JSON object.

`--dry-run --world W`: megatron-core's process groups for W ranks in this one process (a fake
process group), every (tensor, pipeline) position's stage built on the meta device, and its
sharded state dicts checked to tile every parameter exactly once. A layout that cannot work is
refused first, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtp_dist.errors import number, run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.plan", description=__doc__)
    p.add_argument("config", help="a YAML config, e.g. configs/paper/13b-n4.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. engine=deepspeed")
    p.add_argument("--gpus", type=int, help="GPUs to plan for (default: --world, else 8)")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, help="tensor parallelism stays in a node"
    )
    p.add_argument("--gpu-memory", type=number(0), default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpu-tflops", type=number(0), default=989.0, help="dense bf16 peak per GPU")
    p.add_argument(
        "--mfu", type=number(0, 1), default=0.4, help="assumed MFU of the matmuls (0 < MFU <= 1)"
    )
    p.add_argument(
        "--intra-node-gbs",
        type=number(0),
        default=300.0,
        help="GB/s of a GPU's collectives inside a node (NVLink; default 300)",
    )
    p.add_argument(
        "--inter-node-gbs",
        type=number(0),
        default=40.0,
        help="GB/s per GPU between nodes (default 40: a 400 Gb/s NIC per GPU)",
    )
    p.add_argument("--top", type=int, default=10, help="layouts to print (all with --json)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--dry-run", action="store_true", help="build every position on meta")
    p.add_argument("--world", type=int, help="world size of the dry run (default: --gpus)")
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _main(p.parse_intermixed_args(argv)))


def _main(args) -> int:
    from mtp_dist.compat import ignore_known_warnings

    ignore_known_warnings()
    from mtp_dist import config
    from mtp_dist.errors import UserError
    from mtp_dist.plan import layouts, report

    for name in ("gpus", "gpus_per_node", "world", "top"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value} must be >= 1")
    gpus = args.gpus or args.world or 8
    hw = layouts.Hardware(
        gpus,
        args.gpus_per_node,
        args.gpu_memory,
        args.gpu_tflops,
        args.mfu,
        args.intra_node_gbs,
        args.inter_node_gbs,
    )
    cfg = config.load(args.config, args.overrides)
    if args.dry_run:
        from mtp_dist.plan import dry_run

        world = args.world or gpus
        run = layouts.check(cfg, world)
        layout = layouts.plan(cfg, run, layouts.Hardware(world, *_rest(hw)))
        if not layouts.fits(layout, hw):
            raise UserError(layouts.memory_refusal(layout, hw))
        result = dry_run.dry_run(cfg, run)
        out = {"layout": report.layout_json(layout), "dry_run": result}
        print(json.dumps(out, indent=1) if args.json else report.dry_run_text(layout, result))
        return 0
    result = report.build(cfg, hw)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(report.text(result, args.top))
    return 0


def _rest(hw) -> tuple:
    return (hw.gpus_per_node, hw.memory_gib, hw.tflops, hw.mfu, hw.intra_node_gbs,
            hw.inter_node_gbs)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
