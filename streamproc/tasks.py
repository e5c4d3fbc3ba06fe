"""What a :class:`~streamproc.worker.GPUWorker` runs: its model loader and its task.

``model_loader`` comes in two kinds, told apart by its signature:

* **one argument**: ``model_loader(device)`` builds one replica on ``device`` (``"cuda:0"``,
  ``"cpu"``) itself, and returns it ready to run;
* **no arguments**, as in the spec: ``model_loader()`` returns a new model each call, and the
  worker places it: ``.to(device)``, ``.half()`` on CUDA when ``use_fp16`` is on, ``.eval()``.

``task`` is a callable ``task(model, payloads)`` returning one result per payload, or a
:class:`TaskEnums` member naming a built-in task:

* ``TaskEnums.SUMMARIZER`` summarizes with the loader's Hugging Face seq2seq model. The loader
  returns the model, or ``(model, tokenizer)``; without a tokenizer, the one saved with the
  model (its ``name_or_path``) is loaded. Payloads are strings, or feed items (dicts or
  objects) with a ``text`` string; results are summaries, in payload order.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from .errors import InvalidRecord, ModelLoadError
from .settings import GPUConfig

__all__ = ["BoundTask", "TaskEnums", "bind_task", "payload_text", "place"]

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
               inspect.Parameter.VAR_POSITIONAL)


class TaskEnums(StrEnum):
    """Built-in tasks, by name."""

    SUMMARIZER = "summarizer"


@dataclass(frozen=True, slots=True)
class BoundTask(Generic[M, P, R]):
    """A loader that builds a replica on a given device, and the task run on it."""

    config: GPUConfig
    loader: Callable[[str], M]
    task: Callable[[M, Any], Sequence[R]]
    prepare: Callable[[M, list[P]], Any] | None
    cost: Callable[[P], int] | None


def takes_device(model_loader: Callable[..., Any]) -> bool:
    """Whether ``model_loader`` accepts a positional argument (the device)."""
    try:
        parameters = inspect.signature(model_loader).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the one-argument kind
        return True
    return any(p.kind in _POSITIONAL for p in parameters)


def place(model: Any, device: str, use_fp16: bool) -> Any:
    """What the worker does with a zero-argument loader's model: move it to ``device``, halve
    it on CUDA when ``use_fp16`` is on, and switch it to inference mode."""
    if hasattr(model, "to"):
        model = model.to(device)
    if use_fp16 and device.startswith("cuda") and hasattr(model, "half"):
        model = model.half()
    if hasattr(model, "eval"):
        model = model.eval()
    return model


def _build_placed(model_loader: Callable[[], Any], use_fp16: bool, device: str) -> Any:
    return place(model_loader(), device, use_fp16)


def device_loader(model_loader: Callable[..., M], use_fp16: bool) -> Callable[[str], M]:
    """``model_loader`` as a one-argument loader (see the module's docstring)."""
    if takes_device(model_loader):
        return model_loader
    return functools.partial(_build_placed, model_loader, use_fp16)


def bind_task(
    model_loader: Callable[..., Any], config: GPUConfig,
    task: Callable[[M, Any], Sequence[R]] | TaskEnums, *,
    prepare: Callable[[M, list[P]], Any] | None = None, cost: Callable[[P], int] | None = None,
) -> BoundTask[M, P, R]:
    """The worker's loader and task from what its caller gave."""
    if isinstance(task, TaskEnums):
        if prepare is not None or cost is not None:
            raise TypeError(f"{task!r} brings its own prepare and cost steps")
        return _summarizer(model_loader, config)  # type: ignore[return-value]
    return BoundTask(config, device_loader(model_loader, config.use_fp16), task, prepare, cost)


# --- TaskEnums.SUMMARIZER ------------------------------------------------------------------


def payload_text(payload: Any) -> str:
    """The text of a payload: a string, or a feed item (dict or object) with a ``text``."""
    if isinstance(payload, str):
        return payload
    text = payload.get("text") if isinstance(payload, Mapping) else getattr(payload, "text", None)
    if not isinstance(text, str):
        raise InvalidRecord("a summarizer payload is a string, or a feed item with a 'text' "
                            f"string; got {type(payload).__name__}", "invalid_payload")
    return text


def _summarizer(model_loader: Callable[..., Any], config: GPUConfig) -> BoundTask[Any, Any, str]:
    from .engine import calibration_texts, estimate_tokens, warmup_texts
    from .settings import Settings
    from .summarizers import run_prepared

    max_tokens = int(Settings.model_fields["max_input_tokens"].default)
    if config.enable_warmup and not config.warmup_payloads:
        config = config.model_copy(
            update={"warmup_payloads": warmup_texts(max_tokens, config.batch_size)})
    if config.autotune and not config.calibration_payloads:
        config = config.model_copy(
            update={"calibration_payloads": calibration_texts(max_tokens)})

    def cost(payload: Any) -> int:
        try:
            return estimate_tokens(max_tokens, payload_text(payload))
        except InvalidRecord:
            return 1  # it fails alone when its batch runs

    return BoundTask(config, functools.partial(_load_summarizer, model_loader, config.use_fp16,
                                               max_tokens),
                     run_prepared, _prepare, cost)


def _load_summarizer(model_loader: Callable[..., Any], use_fp16: bool, max_tokens: int,
                     device: str) -> Any:
    from .checkpoints import load_pretrained
    from .seq2seq import Seq2SeqSummarizer

    zero_args = not takes_device(model_loader)
    built = model_loader() if zero_args else model_loader(device)
    model, tokenizer = built if isinstance(built, tuple) else (built, None)
    if zero_args:
        model = place(model, device, use_fp16)
    name = str(getattr(model, "name_or_path", "") or "")
    if tokenizer is None:
        if not name:
            raise ModelLoadError("TaskEnums.SUMMARIZER needs a tokenizer: return (model, "
                                 "tokenizer) from the loader, or a model from from_pretrained")
        from transformers import AutoTokenizer

        tokenizer = load_pretrained(name, lambda source, local_only: AutoTokenizer.from_pretrained(
            source, local_files_only=local_only))
    return Seq2SeqSummarizer(model, tokenizer, model_name=name or "model", device=device,
                             max_input_tokens=max_tokens)


def _prepare(model: Any, payloads: list[Any]) -> Any:
    return model.prepare([payload_text(p) for p in payloads])
