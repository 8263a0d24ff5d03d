"""Shared test set-up: offline, quiet, and helpers to run ftlaunch in-process or as the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _library_log_handlers_follow_capture():
    """datasets/transformers create their StreamHandler once, on the sys.stderr of the test that first logged --
    pytest's capture of that test, closed afterwards; a later test's log record then prints '--- Logging error ---'
    with a traceback into its stderr. Point those handlers at the current stderr."""
    import logging

    for name in ("datasets", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers (subclasses)
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream first
    yield


@pytest.fixture(autouse=True)
def _ds_config_dir(tmp_path, monkeypatch):
    """Generated DeepSpeed configs of test runs go to the test's tmp dir, not the repo's ds_configs/."""
    monkeypatch.setenv("FTLAUNCH_DS_CONFIG_DIR", str(tmp_path / "ds_configs"))


def run_inprocess(*argv: str) -> int:
    """`ftlaunch ARGV` in this process (saves ~10 s of imports per call); returns the exit code."""
    from launcher.cli import main

    return main(list(argv))


def run_cli(*argv: str, launcher: list[str] | None = None, env: dict | None = None, timeout: int = 600,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The real command line: `python launcher/run.py ...` or `deepspeed --num_gpus 2 launcher/run.py ...`."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    prefix = launcher or [sys.executable]
    return subprocess.run([*prefix, str(REPO / "launcher" / "run.py"), *argv], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def deepspeed_cmd(num_ranks: int = 2) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks)]


def manifest(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "manifest.json").read_text())
