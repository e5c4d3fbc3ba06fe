"""Shared fixtures: a tiny local seq2seq checkpoint, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamproc.devtools import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-bart"))
