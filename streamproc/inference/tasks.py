"""What a :class:`~streamproc.inference.worker.GPUWorker` runs: its model loader and its task.

``model_loader`` comes in two kinds, told apart by its signature:

* **one argument**: ``model_loader(device)`` builds one replica on ``device`` (``"cuda:0"``,
  ``"cpu"``) itself, and returns it ready to run;
* **no arguments**, as in the seed document: ``model_loader()`` returns a new model each
  call, and the worker places it: ``.to(device)``, ``.half()`` on CUDA when ``use_fp16`` is
  on, ``.eval()``.

``task`` is a callable ``task(model, payloads)`` returning one result per payload, or a
:class:`TaskEnums` member naming a built-in task. The engine knows no built-in task itself:
:data:`BUILT_IN` maps each member to the function that binds it, by import path, and that
module is imported only when a worker asks for it. ``TaskEnums.SUMMARIZER`` is
:func:`streamproc.summarize.task.bind_summarizer`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from .config import GPUConfig

__all__ = ["BUILT_IN", "BoundTask", "TaskEnums", "bind_task", "place", "takes_device"]

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
               inspect.Parameter.VAR_POSITIONAL)


class TaskEnums(StrEnum):
    """Built-in tasks, by name."""

    SUMMARIZER = "summarizer"


# A built-in task -> "module:function" returning its BoundTask from (model_loader, config).
BUILT_IN = {TaskEnums.SUMMARIZER: "streamproc.summarize.task:bind_summarizer"}


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
        module, _, name = BUILT_IN[task].partition(":")
        binder = getattr(importlib.import_module(module), name)
        return binder(model_loader, config)  # type: ignore[no-any-return]
    return BoundTask(config, device_loader(model_loader, config.use_fp16), task, prepare, cost)
