"""Checkpoints that cannot be half-written, and finding the one to resume from.

The HF Trainer writes `checkpoint-N/` in place (weights, optimizer / ZeRO shards from every rank, scheduler, RNG,
trainer_state.json) and then rotates old ones. A kill at any moment of that leaves a directory that *looks* like a
checkpoint. So completeness is explicit here:

* `CheckpointCommitter.on_save` (recipes/callbacks.py) runs after HF has written everything: all ranks meet at a barrier (every rank's ZeRO
  shard is on disk), then rank 0 fsyncs the files and writes + fsyncs `checkpoint-N/.ftlaunch-complete`.
* Only then are old checkpoints rotated (by us, not by HF: `save_total_limit` is taken over so HF never deletes the
  previous checkpoint before the new one is marked). A checkpoint is deleted marker-first, so one half-deleted by a
  kill is unmarked, never "complete".
* `--resume auto` picks the newest *marked* checkpoint; unmarked ones are reported and removed (they are re-created
  when training passes that step again).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = ".ftlaunch-complete"


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and (path / "trainer_state.json").is_file()


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories by step, oldest first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    complete = [p for p in checkpoints(Path(output_dir)) if is_complete(p)]
    return complete[-1] if complete else None


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_complete(path: Path, info: dict | None = None) -> None:
    """Flush every file of the checkpoint to disk, then write the marker atomically (tmp + fsync + rename)."""
    path = Path(path)
    for root, dirs, files in os.walk(path):
        for name in files:
            _fsync_path(Path(root) / name)
        for name in dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(path)
    tmp = path / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step_of(path), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    _fsync_path(path)


def unmark(path: Path) -> None:
    marker = Path(path) / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_path(Path(path))


def delete_checkpoint(path: Path) -> None:
    """Marker first: a kill half-way through leaves an unmarked (incomplete) directory, never a broken 'complete'."""
    unmark(path)
    shutil.rmtree(path, ignore_errors=True)


def rotate(output_dir: Path, keep: int | None, protect: tuple = ()) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (and `protect`); drop older ones and every incomplete one."""
    protected = {Path(p).resolve() for p in protect if p}
    found = checkpoints(output_dir)
    complete = [p for p in found if is_complete(p)]
    doomed = [p for p in found if p not in complete]
    if keep is not None and keep > 0:
        doomed += complete[:-keep]
    protected.update(p.resolve() for p in complete[-1:])  # the last good one stays, whatever `keep` says
    doomed = [p for p in doomed if p.resolve() not in protected]
    for p in doomed:
        delete_checkpoint(p)
    return doomed


def prepare_resume(output_dir: Path, is_main: bool) -> tuple[Path | None, list[Path]]:
    """The checkpoint `--resume auto` continues from, and the incomplete ones it skips (rank 0 removes those)."""
    found = checkpoints(Path(output_dir))
    complete = [p for p in found if is_complete(p)]
    chosen, skipped = (complete[-1] if complete else None), [p for p in found if p not in complete]
    if is_main:
        for p in skipped:
            shutil.rmtree(p, ignore_errors=True)
    return chosen, skipped


def checkpoint_layout(path: Path) -> dict:
    """How a checkpoint was written: world size and whether by DeepSpeed (ZeRO shards) or plain torch."""
    path = Path(path)
    info = {}
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        pass
    shards = list(path.glob("global_step*/*zero_pp_rank_*_optim_states.pt")) + list(path.glob(
        "global_step*/zero_pp_rank_*_model_states.pt"))
    deepspeed = bool(list(path.glob("global_step*"))) or info.get("deepspeed", False)
    world = info.get("world_size")
    if world is None:
        ranks = {re.search(r"zero_pp_rank_(\d+)_", p.name).group(1) for p in shards}
        world = len(ranks) or len(list(path.glob("rng_state_*.pth"))) or 1
    return {"world_size": int(world), "deepspeed": deepspeed}


def check_resumable(path: Path, world_size: int, deepspeed: bool) -> bool:
    """Refuse (UserError, exit 2) a resume that would not be exact; True when it needs DeepSpeed's universal
    checkpoint (`to_universal`): a DeepSpeed checkpoint resumed by DeepSpeed on a new number of ranks, whose ZeRO
    partitions of the optimizer state must be re-cut. The plain HF Trainer silently starts a fresh optimizer from a
    DeepSpeed checkpoint (and the other way round), so a change of launcher is refused. Tried with DeepSpeed
    0.19.8 / transformers 5.23."""
    from launcher.errors import UserError

    layout = checkpoint_layout(path)
    how = lambda ws, ds: f"{ws} rank{'s' if ws != 1 else ''} {'with DeepSpeed' if ds else 'without DeepSpeed'}"
    if layout["deepspeed"] != deepspeed or (layout["world_size"] != world_size and not deepspeed):
        raise UserError(
            f"cannot resume {path.name}: it was written by {how(layout['world_size'], layout['deepspeed'])}, this "
            f"run has {how(world_size, deepspeed)} (its optimizer state cannot be carried over exactly); resume "
            f"with the same launcher{' and rank count' if not deepspeed else ''}, or start afresh in a new "
            f"output_dir (or --resume never)")
    return layout["world_size"] != world_size


def to_universal(path: Path) -> str:
    """Convert checkpoint `path`'s ZeRO shards (its `latest` tag) to DeepSpeed's universal layout, once: written
    under a temporary name and renamed, so a kill mid-way leaves nothing that looks finished. DeepSpeed then loads
    it on any number of ranks (`"checkpoint": {"load_universal": true}`); `latest_universal` names it. Rank 0 only.
    `inject_missing_state`: the HF Trainer's checkpoints lack the Megatron-style `universal_checkpoint_info`, which
    for plain data parallelism (no tensor/pipeline slicing) is empty."""
    from types import SimpleNamespace

    path = Path(path)
    tag = (path / "latest").read_text().strip()
    universal = f"{tag}_universal"
    if not (path / universal).is_dir():
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as convert

        partial = path / f"{universal}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter; errors still raise
            convert(SimpleNamespace(input_folder=str(path / tag), output_folder=str(partial), num_extract_workers=1,
                                    num_merge_workers=1, keep_temp_folder=False, strict=True,
                                    inject_missing_state=True))
        os.replace(partial, path / universal)
    (path / "latest_universal").write_text(universal)
    return universal


class AlreadyTrained(Exception):
    """Resumed from a checkpoint at max_steps: nothing is left to train."""
