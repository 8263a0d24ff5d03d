"""Errors that map to the exit codes of the shared contract (DESIGN.md), and the exit codes a run ends with.

No imports beyond the standard library: `ftlaunch slurm`, `runs` and `plan` read these without loading torch."""
import argparse
import os
import shutil
from pathlib import Path

# What a process killed by SIGTERM reports (128 + 15). The sbatch scripts (launcher/slurm.py) requeue on it; the
# runner returns it after a preemption checkpoint.
PREEMPTED_EXIT_CODE = 143


class _OneLineError(Exception):
    def __init__(self, message=""):
        # Messages quote what the user typed (keys, values, file rows), which may hold line breaks: show them
        # escaped, so the contract "one line" holds whatever the input.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class UserError(_OneLineError):
    """Bad input (config, data, arguments): exit 2 with a one-line message, no traceback."""

    exit_code = 2
    label = "error"


class PlanDoesNotFit(_OneLineError):
    """The plan does not fit the hardware: exit 3; the message says by how much and what would."""

    exit_code = 3
    label = "does not fit"


class PreflightError(RuntimeError):
    """A rank did not answer in time, or the node clearly cannot hold what it is asked to load: exit 1. Rank- or
    node-specific (an unreachable peer, a node short of RAM), so every rank reports its own."""

    exit_code = 1
    label = "pre-flight check failed"


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a UserError (one line, exit 2) instead of printing its usage block;
    `--help` still prints the whole usage."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def writable_dir(path, field: str) -> Path | None:
    """Create directory `path` if needed and prove it writable, or raise a UserError naming `field` (directories
    created here for the probe are removed again). Returns the outermost directory created here (`path` or one of
    its parents), None if `path` existed: what `remove_created` takes back if the command is refused later."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}: {path} exists and is not a directory; choose another {field}")
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ftlaunch-write-test-", dir=path)  # unique across nodes' pid spaces
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_created(path, created)
        raise UserError(f"{field}: cannot write to {path} ({e.strerror or e}); choose a writable {field}") from None
    return created


def remove_created(path, created: Path | None) -> None:
    """Take back what `writable_dir` made: `path` with its contents, then each parent up to `created` while it is
    empty (another run may have started in a sibling meanwhile: its directory, and their common parent, stay)."""
    if created is None:
        return
    path, created = Path(path), Path(created)
    shutil.rmtree(path, ignore_errors=True)
    for parent in path.parents:
        if parent != created and created not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
