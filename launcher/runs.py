"""`ftlaunch runs [DIR]`: past runs under DIR (default runs/) from their manifest.json files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.checkpoints import newest_complete_checkpoint
from launcher.config import RUNS_DIR
from launcher.errors import ArgParser, UserError
from launcher.manifest import read_manifest


def find_runs(root: Path) -> list[dict]:
    rows = []
    for manifest in sorted(root.rglob("manifest.json")):
        data = read_manifest(manifest.parent)
        if data is None:  # unreadable, or another tool's manifest.json
            continue
        metrics = _section(data, "metrics")
        evals, after = _section(metrics, "eval"), _section(metrics, "after")
        step = data.get("step")
        if step is None:
            ckpt = newest_complete_checkpoint(manifest.parent)
            step = int(ckpt.name.split("-")[1]) if ckpt else 0
        # the held-out score after training: the recipe's own metric where it names one (classify.metric: f1)
        chosen = {"f1": "f1_macro"}.get(_section(_section(data, "config"), "classify").get("metric"))
        keys = [chosen] if chosen in after else list(after)
        score = next((f"{k}={after[k]:.3f}" for k in keys if isinstance(after[k], float)), None)
        if score is None and isinstance(evals.get("eval_loss"), float):
            score = f"eval_loss={evals['eval_loss']:.4f}"
        rows.append({"recipe": data.get("recipe"), "method": data.get("method"), "status": data.get("status"),
                     "step": step, "score": score or "-", "updated": data.get("updated"),
                     "path": str(manifest.parent)})
    return rows


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def cmd_runs(argv: list[str]) -> int:
    parser = ArgParser(prog="ftlaunch runs", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="where to look (default runs/)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.dir is not None and not Path(args.dir).is_dir():  # the default may not exist yet: no runs
        raise UserError(f"ftlaunch runs: {args.dir} is not a directory")
    args.dir = args.dir or RUNS_DIR
    rows = find_runs(Path(args.dir))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {args.dir}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs under {args.dir}")
    for column in ("recipe", "method", "status", "step", "score", "updated", "path"):
        table.add_column(column, overflow="fold")  # wrap, never cut a path or score to "…" on a narrow terminal
    for row in rows:
        shown = dict(row, updated=str(row["updated"] or "-")[:16].replace("T", " "))  # minutes are enough here
        table.add_row(*(str(shown[c]) for c in ("recipe", "method", "status", "step", "score", "updated", "path")))
    # Piped output (grep, a file) gets full-width rows instead of rich's 80-column default.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return 0
