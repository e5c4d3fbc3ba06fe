"""Helpers for your own tests of code that uses streamproc, shipped with the package (as
``bytewax.testing`` is): a real local Kafka broker and the chores around it, a tiny random
seq2seq checkpoint built with no downloads, a model to break on purpose, and a set of bad
records. streamproc's own QA suites (the crash suite, the fault matrix) live outside the
package, in the repository's ``qa/``.

The submodules import what they need when they are imported: :mod:`.kafka` aiokafka,
:mod:`.tiny_model` torch and transformers (when it builds), :mod:`.breakable` neither.
"""

from __future__ import annotations

__all__: list[str] = []
