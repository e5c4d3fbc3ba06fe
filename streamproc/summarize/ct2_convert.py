"""Converting a Hugging Face seq2seq checkpoint to CTranslate2, once, cached on disk.

The converted model lives in ``CT2_CACHE_DIR/<checkpoint key>-<compute type>/``. The key is
a SHA-256 of the checkpoint's content: for a local directory, every file's path and bytes;
for a model in the Hugging Face cache, its name and the snapshot's commit hash (which names
the content). A restart finds the directory and skips the conversion; a changed checkpoint
gets a new key. Conversion writes into a temporary directory and renames it into place under
a file lock, so concurrent replicas or processes never see a half-written model.

ctranslate2's BART/mBART/PEGASUS converters read ``config.normalize_before``, which
transformers 5 configs no longer carry; :class:`_Converter` fills in the architecture's
known value (BART is post-norm; mBART and PEGASUS are pre-norm) when it is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["NORMALIZE_BEFORE", "checkpoint_key", "converted_model", "default_cache_dir"]

log = logging.getLogger("streamproc.ct2")

# model_type -> pre-norm?, for the converters that read ``config.normalize_before``.
NORMALIZE_BEFORE = {"bart": False, "mbart": True, "pegasus": True}
_MODEL_FILE = "model.bin"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamproc" / "ctranslate2"


def _directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def checkpoint_key(source: str) -> str:
    """A content key for ``source``: a local checkpoint directory, or a model name that is in
    the local Hugging Face cache (as :func:`.pretrained.load_pretrained` leaves it)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _directory_digest(path)[:24]
    from transformers.utils import cached_file

    config = cached_file(source, "config.json", local_files_only=True)
    if config is None:
        raise ModelLoadError(f"MODEL_NAME={source!r}: config.json is not in the local cache")
    commit = Path(config).parent.name  # .../snapshots/<commit>/config.json
    return hashlib.sha256(f"{source}\0{commit}".encode()).hexdigest()[:24]


def _converter_class() -> Any:
    from ctranslate2.converters import TransformersConverter

    class _Converter(TransformersConverter):  # type: ignore[misc]
        """TransformersConverter, with ``config.normalize_before`` filled in when missing."""

        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            config = model.config
            known = NORMALIZE_BEFORE.get(getattr(config, "model_type", ""))
            if known is not None and not hasattr(config, "normalize_before"):
                config.normalize_before = known
            return model

    return _Converter


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_model(source: str, compute_type: str, cache_dir: Path) -> tuple[Path, bool]:
    """The CTranslate2 model directory for ``source`` at ``compute_type``, converting it first
    if the cache lacks it; and whether this call converted it."""
    target = cache_dir / f"{checkpoint_key(source)}-{compute_type}"
    if (target / _MODEL_FILE).is_file():
        return target, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f"{target.name}.lock"):
        if (target / _MODEL_FILE).is_file():  # another replica or process converted it
            return target, False
        started = time.monotonic()
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
        try:
            _converter_class()(source).convert(
                str(scratch), quantization=compute_type, force=True
            )
            shutil.rmtree(target, ignore_errors=True)  # a leftover without model.bin
            scratch.rename(target)
        except Exception as exc:
            raise ModelLoadError(
                f"could not convert MODEL_NAME={source!r} to CTranslate2 ({type(exc).__name__}: "
                f"{exc}); set SEQ2SEQ_BACKEND=transformers to decode with HF generate"
            ) from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s to CTranslate2 (%s) in %.1f s: %s", source, compute_type,
             time.monotonic() - started, target)
    return target, True
