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
    A truncated last line (a run killed while writing it) is skipped with a note. Where the
    number of heads changed (a new run in the same directory), the records with the last
    record's number of heads are kept, with a note."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: give a run directory of mtp_dist.train")
    lines = [ln for ln in path.read_bytes().decode("utf-8", "replace").splitlines() if ln.strip()]
    parsed = []
    for i, line in enumerate(lines, start=1):
        try:
            parsed.append(_record(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
            if i == len(lines):
                print(f"note: {path}: skipped a truncated last line", file=sys.stderr)
                continue
            raise ReportError(
                f"{path} line {i} is not a metrics record ({e}): it is corrupt; remove the line"
            ) from e
    if not parsed:
        raise ReportError(f"{path} holds no steps yet: train first, then report")
    n = len(parsed[-1]["head_losses"])
    kept = [r for r in parsed if len(r["head_losses"]) == n]
    if len(kept) < len(parsed):
        print(
            f"note: {path}: {len(parsed) - len(kept)} records of another number of heads (an "
            f"earlier run in this directory) left out; the plot shows the {n}-head run",
            file=sys.stderr,
        )
    by_step = {r["step"]: r for r in kept}
    return [by_step[s] for s in sorted(by_step)]


def _numbers(value, key: str, length: int | None = None) -> list:
    if not isinstance(value, list) or not value or (length is not None and len(value) != length):
        raise ValueError(f"{key} must be a list of numbers, one per head")
    for x in value:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            raise ValueError(f"{key} holds {x!r}, not a number")
    return value


def _record(r) -> dict:
    """One metrics record, its types checked (what plot and the summary read)."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    step = r.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} is not a step number")
    heads = _numbers(r.get("head_losses"), "head_losses")
    if "eval_head_accuracy" in r:
        _numbers(r["eval_head_accuracy"], "eval_head_accuracy", len(heads))
    return r


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
    # Parsed inside run_cli: --help into a closed pipe ends as quietly as any output.
    return run_cli(lambda: _main(p.parse_args(argv)))


def _main(args) -> int:
    from mtp_dist.files import check_not_an_input

    out = args.out or args.run_dir / "losses.png"
    check_not_an_input(out, [args.run_dir / "metrics.jsonl"], "report")
    if out.suffix.lower() != ".png":
        raise ReportError(f"--out {out}: give a .png path (the report is a PNG image)")
    records = load_records(args.run_dir)
    out = plot(records, out)
    first, last = records[0], records[-1]
    heads = " ".join(
        f"{a:.2f}->{b:.2f}" for a, b in zip(first["head_losses"], last["head_losses"], strict=True)
    )
    print(f"{len(records)} steps | per-head loss {heads} | plot {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
