"""Worker run by tests/test_plan.py: every paper config built on the meta device at many
layouts, one pipeline stage at a time, on a fake process group of the layout's size (one
process, no GPU). Prints one JSON object: config name -> [{tp, pp, stage, params}], the
parameters the built stage holds on tensor-parallel rank 0 (every TP rank holds the same)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtp_dist.compat import ignore_known_warnings

ignore_known_warnings()

from mtp_dist import config  # noqa: E402
from mtp_dist.model.costs import pipeline_split  # noqa: E402
from mtp_dist.model.model import build_model  # noqa: E402
from mtp_dist.plan.dry_run import fake_world, global_rank  # noqa: E402

LAYOUTS = [
    (1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2), (8, 2),
    (1, 3), (4, 4), (8, 4), (1, 5), (2, 7), (2, 8),
]  # fmt: skip


def main(paths: list[str]) -> None:
    out = {}
    for path in paths:
        rows = []
        for tp, pp in LAYOUTS:
            try:
                cfg = config.load(path, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])
            except config.ConfigError:
                continue  # a layout the config refuses (e.g. heads not divisible by TP)
            for stage in range(pp):
                with fake_world(global_rank(0, stage, tp, 1), tp * pp, tp, pp):
                    split = pipeline_split(cfg.model, cfg.parallel)
                    model = build_model(cfg.model, tp, pp, stage, device="meta", split=split)
                    params = sum(p.numel() for p in model.parameters())
                rows.append({"tp": tp, "pp": pp, "stage": stage, "params": params})
        out[Path(path).stem] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
