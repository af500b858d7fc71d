"""`python -m mtp_dist.report RUN_DIR`: per-head loss curves (and eval accuracy) to a PNG."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtp_dist.errors import UserError, run_cli
from mtp_dist.files import atomic_path


class ReportError(UserError):
    pass


def load_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, keeping the last record of each step (a resumed run repeats).
    A truncated last line (a run killed while writing it) is skipped with a note."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: give a run directory of mtp_dist.train")
    lines = [ln for ln in path.read_bytes().decode("utf-8", "replace").splitlines() if ln.strip()]
    by_step = {}
    for i, line in enumerate(lines, start=1):
        try:
            r = json.loads(line)
            by_step[int(r["step"])] = r
            len(r["head_losses"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if i == len(lines):
                print(f"note: {path}: skipped a truncated last line", file=sys.stderr)
                continue
            raise ReportError(
                f"{path} line {i} is not a metrics record ({e}): it is corrupt; remove the line"
            ) from e
    if not by_step:
        raise ReportError(f"{path} holds no steps yet: train first, then report")
    return [by_step[s] for s in sorted(by_step)]


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(records[0]["head_losses"])
    evals = [r for r in records if "eval_head_losses" in r]
    panels = [("training loss per head", "cross-entropy (nats)", records, "head_losses")]
    if evals:
        panels += [
            ("validation loss per head", "cross-entropy (nats)", evals, "eval_head_losses"),
            ("validation accuracy per head", "top-1 accuracy", evals, "eval_head_accuracy"),
        ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, rows, key) in zip(axes[0], panels, strict=True):
        xs = [r["step"] for r in rows]
        marker = "o" if rows is evals else None
        for i in range(n):
            ax.plot(xs, [r[key][i] for r in rows], marker=marker, label=f"head {i + 1} (t+{i + 1})")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtp_dist.report", description=__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/losses.png)")
    args = p.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> int:
    records = load_records(args.run_dir)
    out = plot(records, args.out or args.run_dir / "losses.png")
    first, last = records[0], records[-1]
    heads = " ".join(
        f"{a:.2f}->{b:.2f}" for a, b in zip(first["head_losses"], last["head_losses"], strict=True)
    )
    print(f"{len(records)} steps | per-head loss {heads} | plot {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
