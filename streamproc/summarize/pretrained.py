"""Finding and loading a Hugging Face checkpoint without ever hanging on the Hub.

Order: a local directory; else the local Hugging Face cache; else the Hub, after one probe of
the model's ``config.json`` with no retries. Every failure is a
:class:`~streamproc.errors.ModelLoadError` that says what to set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import ModelLoadError

__all__ = ["load_pretrained", "torch_dtype"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_T = TypeVar("_T")

def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.strip().lower() in _TRUE for flag in flags)


def _hub_problem(name: str) -> str | None:
    """Why the Hub cannot serve ``name`` now: one HEAD request, no retries; None if it can."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(
            hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT,
            retry_on_errors=False,
        )
    except Exception as exc:  # any failure means "not reachable"
        first_line = next(iter(str(exc).splitlines()), "")
        return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    return None


def _not_found(name: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} is neither in the local Hugging Face cache nor reachable on the Hub "
        f"({why}). Set MODEL_NAME to a local directory holding the checkpoint "
        "(config.json, weights, tokenizer files), or pre-download it into the cache."
    )


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def load_pretrained(name: str, loader: Callable[[str, bool], _T]) -> _T:
    """Run ``loader(source, local_files_only)`` for a local dir, the HF cache, then the Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return loader(str(path), True)
        except Exception as exc:
            message = f"MODEL_NAME={name!r} is a directory but not a loadable checkpoint: {exc}"
            raise ModelLoadError(message) from exc
    if _looks_like_path(name):
        raise ModelLoadError(f"MODEL_NAME={name!r} looks like a path but no such directory exists")
    try:
        return loader(name, True)
    except Exception:  # not (fully) cached: try the Hub below
        pass
    if _offline():
        raise _not_found(name, "offline mode is on: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE")
    problem = _hub_problem(name)
    if problem is not None:
        raise _not_found(name, problem)
    try:
        return loader(name, False)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {name!r} from the Hub: {exc}") from exc


def torch_dtype(device: str, use_fp16: bool) -> torch.dtype:
    return torch.float16 if use_fp16 and device.startswith("cuda") else torch.float32
