"""A host without TensorFlow (JAX or PyTorch GPU hosts) must name its Keras backend."""

from __future__ import annotations

import importlib.util

import pytest

from ops import cli


def test_no_tensorflow_and_no_backend_named_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorflow" else real_find_spec(name, *rest))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with pytest.raises(SystemExit, match="TensorFlow is not installed and KERAS_BACKEND is not set"):
        cli.require_keras_backend()
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    cli.require_keras_backend()  # a named backend is enough


def test_tensorflow_installed_needs_no_backend_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: object() if name == "tensorflow" else real_find_spec(name, *rest))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    cli.require_keras_backend()  # Keras's default, TensorFlow, is there
