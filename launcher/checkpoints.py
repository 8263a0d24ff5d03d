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
import sys
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


def _umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, and a thread writing meanwhile would get
    world-writable files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # the usual default where /proc is not there


def readable_weights(path: Path) -> None:
    """safetensors writes its files 0600 whatever the umask: give them the mode every other file gets (0644 under
    the usual umask 022), so teammates on a shared cluster can read the weights the others can."""
    umask = _umask()
    for file in Path(path).rglob("*.safetensors"):
        file.chmod(0o666 & ~umask)


def flush_to_disk(path: Path) -> None:
    """fsync every file and directory under `path`. A node's own writes may sit in its page cache (Lustre keeps them
    past close), so each node flushes before rank 0 writes the marker, not rank 0 alone."""
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(Path(path))


def mark_complete(path: Path, info: dict | None = None) -> None:
    """Flush every file of the checkpoint to disk, then write the marker atomically (tmp + fsync + rename)."""
    path = Path(path)
    readable_weights(path)
    flush_to_disk(path)
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


# Recipe keys a checkpoint's tensors depend on (which model, which adapter of which shape, 4-bit or not): resuming
# under other values fails deep inside torch (size mismatch, parameter groups) after the run's files were
# rewritten, or silently trains something else. Attention backend, dropout, learning rate and the like may change.
STRUCTURAL_KEYS = ("method", "model.name", "model.tiny", "peft.method", "peft.r", "peft.target_modules",
                   "peft.num_virtual_tokens", "quant.load_in_4bit")


def choose_resume(output_dir: Path, how: str, settings: dict | None, is_main: bool) -> Path | None:
    """The checkpoint this start continues from (`--resume auto | never | PATH`), or None to start afresh; refuses
    (UserError, exit 2) what would mix two runs. `settings` is the resolved recipe (config.to_yaml_dict), None for
    a method that never resumes (it restarts from scratch whatever is there)."""
    from launcher.errors import UserError

    output_dir = Path(output_dir)
    if how == "never":
        old = [p.name for p in checkpoints(output_dir)]
        if old:  # the new run's checkpoints would rotate out first (lower steps) and a later resume take the old
            raise UserError(f"--resume never: {output_dir} holds checkpoints of an earlier run ({', '.join(old)}); "
                            f"use a new output_dir, or --resume auto to continue that run")
        return None
    if how == "auto":
        chosen, skipped = prepare_resume(output_dir, is_main)
        if is_main:
            for path in skipped:
                print(f"ftlaunch: skipping incomplete {path.name} (no completion marker: the run stopped while saving "
                      f"it); removed", file=sys.stderr, flush=True)
    else:
        chosen = Path(how)
        if not chosen.is_dir():
            raise UserError(f"--resume {how}: no such checkpoint directory")
        if not (chosen / "trainer_state.json").is_file():
            inside = newest_complete_checkpoint(chosen)
            hint = f"; did you mean --resume {inside}?" if inside else ""
            raise UserError(f"--resume {how}: not a checkpoint (no trainer_state.json){hint}")
    if chosen is not None and settings is not None:
        check_same_settings(chosen, settings)
    return chosen


def check_same_settings(checkpoint: Path, settings: dict) -> None:
    """Refuse a resume whose recipe differs from the one that wrote `checkpoint` (its run's recipe.yaml) in a
    section its tensors depend on; training length, logging, data and the like may change."""
    import yaml

    from launcher.errors import UserError

    saved_file = Path(checkpoint).parent / "recipe.yaml"
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # written elsewhere or by hand: nothing to compare with
    changed = []
    for key in STRUCTURAL_KEYS:
        known, before = _lookup(saved, key)
        _, now = _lookup(settings, key)
        # a key an older recipe.yaml lacks, or a value redaction touched (an env secret inside a path), says nothing
        if known and before != now and "***" not in f"{before}{now}":
            changed.append(f"{key}={before!r} (now {now!r})")
    if changed:
        raise UserError(f"cannot resume {checkpoint}: its run was made with {'; '.join(changed)}; resume with the "
                        f"same settings, or start afresh in a new output_dir")


def _lookup(data: dict, dotted: str):
    """(present, value) of `a.b` in nested dicts."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def checkpoint_layout(path: Path) -> dict:
    """How a checkpoint was written: world size, whether by DeepSpeed or plain torch, and DeepSpeed's ZeRO stage
    (None where unknown: an older checkpoint with ZeRO optimizer shards, stage 1-3)."""
    path = Path(path)
    info = {}
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        pass
    optim_shards = list(path.glob("global_step*/*zero_pp_rank_*_optim_states.pt"))
    shards = optim_shards + list(path.glob("global_step*/zero_pp_rank_*_model_states.pt"))
    deepspeed = bool(list(path.glob("global_step*"))) or info.get("deepspeed", False)
    world = info.get("world_size")
    if world is None:
        ranks = {re.search(r"zero_pp_rank_(\d+)_", p.name).group(1) for p in shards}
        world = len(ranks) or len(list(path.glob("rng_state_*.pth"))) or 1
    stage = info.get("zero_stage")
    if stage is None and deepspeed and not optim_shards:
        stage = 0  # ZeRO-0 keeps the whole optimizer state in mp_rank_00_model_states.pt
    return {"world_size": int(world), "deepspeed": deepspeed, "zero_stage": stage}


def resume_zero_stage(output_dir: Path, how: str) -> tuple[int, str] | None:
    """(ZeRO stage, name) of the checkpoint a `--resume auto | PATH` start would take, when DeepSpeed wrote it and
    its stage is known; None otherwise (nothing to resume, a plain-torch checkpoint, an older one)."""
    if how == "never":
        return None
    path = newest_complete_checkpoint(output_dir) if how == "auto" else Path(how)
    if path is None or not path.is_dir():
        return None
    layout = checkpoint_layout(path)
    return (layout["zero_stage"], path.name) if layout["deepspeed"] and layout["zero_stage"] is not None else None


# Optimizers whose state DeepSpeed's universal checkpoint can re-cut: ds_to_universal knows Adam's exp_avg and
# exp_avg_sq only (bitsandbytes' 8-bit state1/state2, Lion, SGD, Adafactor are not converted).
UNIVERSAL_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
CONVERT_TIMEOUT_HOURS = 6  # rank 0 converts while the others wait: a 70B full fine-tune's states are ~1 TB


def check_resumable(path: Path, world_size: int, deepspeed: bool, optimizer: str | None = None,
                    zero_stage: int | None = None) -> bool:
    """Refuse (UserError, exit 2) a resume that would not be exact; True when it needs DeepSpeed's universal
    checkpoint (`to_universal`): a DeepSpeed checkpoint resumed by DeepSpeed on a new number of ranks, whose ZeRO
    partitions of the optimizer state must be re-cut. ZeRO-0 writes its optimizer state whole, which loads on any
    number of ranks as it is, but only into ZeRO-0 (and a ZeRO-1-3 one only into ZeRO-1-3). The plain HF Trainer
    silently starts a fresh optimizer from a DeepSpeed checkpoint (and the other way round), so a change of launcher
    is refused. Tried with DeepSpeed 0.19.8 / transformers 5.23. `zero_stage`: this run's plan."""
    from launcher.errors import UserError

    layout = checkpoint_layout(path)
    how = lambda ws, ds: f"{ws} rank{'s' if ws != 1 else ''} {'with DeepSpeed' if ds else 'without DeepSpeed'}"
    if layout["deepspeed"] != deepspeed or (layout["world_size"] != world_size and not deepspeed):
        raise UserError(
            f"cannot resume {path.name}: it was written by {how(layout['world_size'], layout['deepspeed'])}, this "
            f"run has {how(world_size, deepspeed)} (its optimizer state cannot be carried over exactly); resume "
            f"with the same launcher{' and rank count' if not deepspeed else ''}, or start afresh in a new "
            f"output_dir")
    was = layout["zero_stage"]  # None: 1, 2 or 3 (older checkpoints did not record it)
    if deepspeed and zero_stage is not None and (was != zero_stage if was is not None else zero_stage == 0):
        # each stage has its own file layout (ZeRO-0: the optimizer whole; 1/2: flat fp32 partitions; 3: partitioned
        # parameters too), and DeepSpeed loads a checkpoint only into the stage that wrote it
        raise UserError(f"cannot resume {path.name} with ZeRO-{zero_stage}: it was written with ZeRO-"
                        f"{was if was is not None else '1, 2 or 3'}; pin that stage (plan.zero_stage="
                        f"{was if was is not None else 1}), or start afresh in a new output_dir")
    repartition = layout["world_size"] != world_size and was != 0
    from launcher.recipe_request import default_optimizer

    optimizer = optimizer or default_optimizer()  # the HF Trainer's when a recipe names none
    if repartition and optimizer not in UNIVERSAL_OPTIMIZERS:
        raise UserError(
            f"cannot resume {path.name} on {world_size} ranks: it was written by {layout['world_size']}, and "
            f"DeepSpeed re-cuts only Adam's state ({', '.join(UNIVERSAL_OPTIMIZERS)}), not training.optim="
            f"{optimizer}; resume with {layout['world_size']} ranks, or start afresh in a new output_dir")
    return repartition


def to_universal(path: Path, workers: int = 1) -> str:
    """Convert checkpoint `path`'s ZeRO shards (its `latest` tag) to DeepSpeed's universal layout, once: written
    under a temporary name and renamed, so a kill mid-way leaves nothing that looks finished (the next try removes
    the remains). DeepSpeed then loads it on any number of ranks (`"checkpoint": {"load_universal": true}`);
    `latest_universal` names it. Rank 0 only. `inject_missing_state`: the HF Trainer's checkpoints lack the
    Megatron-style `universal_checkpoint_info`, which for plain data parallelism (no tensor/pipeline slicing) is
    empty."""
    from types import SimpleNamespace

    from launcher.errors import UserError

    path = Path(path)
    tag = (path / "latest").read_text().strip()
    universal = f"{tag}_universal"
    if not (path / universal).is_dir():
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as convert

        partial = path / f"{universal}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shards = sum(f.stat().st_size for f in (path / tag).rglob("*") if f.is_file())
        free = shutil.disk_usage(path).free
        if free < 2 * shards:  # the universal copy and its temporary fragments, each about the shards' size
            raise UserError(f"cannot re-cut {path.name} for a new rank count: converting needs ~"
                            f"{2 * shards / 2**30:.1f} GiB free beside it, {free / 2**30:.1f} GiB is; free space "
                            f"or resume with the old rank count")
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter; errors still raise
            convert(SimpleNamespace(input_folder=str(path / tag), output_folder=str(partial),
                                    num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                                    strict=True, inject_missing_state=True))
        os.replace(partial, path / universal)
    (path / "latest_universal").write_text(universal)
    return universal


def load_universal_on_all_ranks(path: Path, is_main: bool, world_size: int) -> None:
    """Rank 0 converts (`to_universal`) while the others wait on a gloo group with a long timeout (the default
    process group's 10 minutes is too short for a large model, and NCCL would need a device per rank); rank 0's
    outcome is broadcast, so a failed conversion stops every rank with the same one line, and every rank checks
    that it sees the result (checkpoints must be on storage all nodes share)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from launcher.errors import UserError

    group = dist.new_group(backend="gloo", timeout=timedelta(hours=CONVERT_TIMEOUT_HOURS))
    error = None
    if is_main:
        was = checkpoint_layout(path)["world_size"]
        print(f"ftlaunch: {path.name} was written by {was} rank(s), this run has {world_size}: re-cutting its ZeRO "
              f"partitions (DeepSpeed universal checkpoint)", file=sys.stderr, flush=True)
        try:
            to_universal(path, workers=max(1, min(4, (os.cpu_count() or 1) // 2)))
        except Exception as exc:  # every rank must hear of it, not wait for a timeout
            error = exc
    flag = torch.tensor([0 if error is None else 1])
    dist.broadcast(flag, src=0, group=group)
    if error is not None:
        raise error
    if flag.item():
        raise UserError(f"resume {path.name}: rank 0 could not convert it for the new rank count (see its error)")
    if not (path / "latest_universal").is_file():
        raise UserError(f"resume {path.name}: rank 0 converted it, but this rank does not see "
                        f"{path / 'latest_universal'}; checkpoints must be on storage every node shares")
    dist.destroy_process_group(group)


class AlreadyTrained(Exception):
    """Resumed from a checkpoint at max_steps: nothing is left to train."""
