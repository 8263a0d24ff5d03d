"""The run manifest: versions, git revision, command, seed, plan, status. Secrets never reach it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# Keys whose values are secrets: the whole name or its last `_`/`-`/`.` part (hub_token, WANDB_API_KEY,
# db.password), not names that merely contain the word (max_tokens, include_num_input_tokens_seen), nor a
# tokenizer's special tokens (TRL configs take eos_token / pad_token).
SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|secret[_-]?key|password|passwd|api[_-]?key|credentials?|auth)$",
                        re.I)
SPECIAL_TOKEN_KEYS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
# Values that are secrets whatever their key: HF, OpenAI-style and GitHub tokens.
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{20,})$")


def is_secret_key(key: str) -> bool:
    return bool(key) and key.lower() not in SPECIAL_TOKEN_KEYS and bool(SECRET_KEY.search(key))
# Environment variables whose values are scrubbed from every string written: any name that mentions one of these.
SECRET_ENV = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.I)
PACKAGES = ("torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "bitsandbytes", "datasets")


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 6]


def redact(value, key: str = ""):
    """Replace secrets in nested data: values under secret-looking keys, and any secret env value inside strings."""
    if is_secret_key(key) and value not in (None, "", False):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for secret in _secret_values():
            value = value.replace(secret, "***")
        if "=" in value:  # key=value on a command line
            k, _, v = value.partition("=")
            if is_secret_key(k.split(".")[-1]) and v:
                value = f"{k}=***"
    return value


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, default=str))
    os.replace(tmp, path)


LOCK_FILE = ".ftlaunch-run.lock"
_held: list = []  # the open lock file: the lock lasts as long as this process, however it ends


# A network file system keeps a dead node's lock until its lease ends (NFSv4 ~90 s, Lustre eviction ~100 s or more):
# this same job, requeued after its node died, waits that long for its own old lock before going on without one.
OWN_STALE_LOCK_SECONDS = 180


def hold_output_dir(output_dir: Path, own_stale_s: float = OWN_STALE_LOCK_SECONDS) -> str | None:
    """Rank 0 takes `output_dir` for this run (an exclusive flock), or returns why not: another live run holds it
    (two jobs of one recipe, a sweep submitted twice, would resume each other's checkpoints and rotate and delete
    each other's). The caller has every rank raise that, as only rank 0 knows. The lock dies with its process, so a
    crashed or requeued run leaves none behind on a local disk. Where the file system has no locks (some Lustre
    mounts) the run goes on unguarded."""
    import fcntl
    import socket

    path = Path(output_dir) / LOCK_FILE
    job = os.environ.get("SLURM_JOB_ID")
    deadline = time.time() + own_stale_s
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if job and f", Slurm job {job}," in holder:
                if time.time() < deadline:
                    time.sleep(min(10.0, own_stale_s))
                    continue
                print(f"ftlaunch: warning: {output_dir} is still locked by this job's previous start ({holder}), "
                      f"whose node is gone; going on without the lock", file=sys.stderr, flush=True)
                return None
            return (f"output_dir: {output_dir} is in use by a run that is still going ({holder}); give another "
                    f"output_dir, or wait for that run to end")
        except OSError:
            handle.close()
            return None  # no locking here: nothing to hold
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(handle.fileno()).st_ino:  # its holder released and removed it meanwhile: lock anew
            handle.close()
            continue
        break
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}{f', Slurm job {job}' if job else ''}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _held.append(handle)
    return None


def release_output_dir() -> None:
    """End this process's hold when its run returns (the process may go on: tests, an in-process pipeline); the
    file goes too, so that a refused run leaves a directory as it found it."""
    while _held:
        handle = _held.pop()
        Path(handle.name).unlink(missing_ok=True)  # still held: no other run is using it
        handle.close()


def read_manifest(output_dir: Path) -> dict | None:
    """The run's manifest.json, or None where there is none, or none of ours (unreadable, not a JSON object, or
    another tool's manifest.json: ours always names recipe, method and status)."""
    path = Path(output_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and {"recipe", "method", "status"} <= set(data) else None


def replayable_command(argv: list[str]) -> list[str]:
    """The command as typed: `ftlaunch run ...` keeps its sub-command; a launcher's per-rank --local_rank is dropped
    (the manifest's world_size says how many ranks ran)."""
    program = sys.argv[0]
    sub_command = ["run"] if Path(program).name == "ftlaunch" else []
    return [program, *sub_command, *(a for a in argv if not a.startswith(("--local_rank", "--local-rank")))]


def write_manifest(output_dir: Path, cfg, plan, argv: list[str], status: str, world_size: int) -> None:
    from launcher.config import to_yaml_dict

    previous = read_manifest(output_dir) or {}
    data = {
        "recipe": cfg.name,
        "method": cfg.method,
        "status": status,
        "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": replayable_command(argv),
        "seed": cfg.seed,
        "world_size": world_size,
        "git_revision": _git_revision(),
        "versions": _versions(),
        "config": to_yaml_dict(cfg),
        "plan": plan.to_json() if hasattr(plan, "to_json") else plan,
        "attempts": previous.get("attempts", 0) + 1,
        "metrics": previous.get("metrics"),
    }
    _write_atomic(Path(output_dir) / "manifest.json", data)


def update_manifest(output_dir: Path, **fields) -> None:
    data = read_manifest(output_dir) or {}
    data.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_atomic(Path(output_dir) / "manifest.json", data)


# Settings that do not change what a finished run trained: where it is, what it is called, how it is evaluated
# and guarded, which what-if it was planned for.
UNTRAINED_KEYS = ("output_dir", "description", "name", "eval.", "safety.", "plan.inventory")


def changed_settings(manifest: dict | None, cfg) -> list[str]:
    """'key: before -> now' for each trained setting of `cfg` that differs from a finished run's (its manifest)."""
    from launcher.config import to_yaml_dict

    if not manifest or manifest.get("status") != "finished" or not isinstance(manifest.get("config"), dict):
        return []
    before, now = _flat(manifest["config"]), _flat(to_yaml_dict(cfg))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) & set(now))
            if not k.startswith(UNTRAINED_KEYS) and _same_place(before[k]) != _same_place(now[k])
            and "***" not in f"{before[k]}{now[k]}"]  # redaction may touch an env value inside a path


def summarize_changes(changed: list[str]) -> str:
    """The first three of changed_settings' lines, for a one-line refusal."""
    return "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")


def check_finished_run_unchanged(out: Path, previous: dict, cfg, resume: str) -> None:
    """Rerunning a finished run's command does nothing; anything else aimed at its directory is refused (UserError,
    exit 2) rather than quietly ignored: other trained settings, --resume never, a checkpoint path that is not one."""
    from launcher.errors import UserError

    if resume == "never":
        raise UserError(f"--resume never: {out} already holds a finished run; use a new output_dir")
    if resume != "auto" and not (Path(resume) / "trainer_state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
    changed = changed_settings(previous, cfg)
    if changed:
        raise UserError(f"{out} already holds a finished run with other settings ({summarize_changes(changed)}); "
                        f"use a new output_dir, or to train this model "
                        f"further start from it: model.name={out} output_dir=NEW")


def _same_place(value):
    """A path as the same place however it is spelt (relative or absolute)."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _flat(data: dict) -> dict:
    """Dotted key -> value of every setting that is not a section."""
    from launcher.config_checks import walk

    return {where: value for where, key, value in walk(data) if key and not isinstance(value, dict)}
