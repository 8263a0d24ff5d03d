"""Finding the checkpoint to resume from. A checkpoint counts only when complete (trainer_state.json is the last
file the HF Trainer writes into a checkpoint directory)."""
from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories by step, oldest first (complete or not)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    complete = [p for p in checkpoints(Path(output_dir)) if is_complete(p)]
    return complete[-1] if complete else None
