"""Process-group set-up details that need no second process."""
from __future__ import annotations

import os
import sys

from solar_dist.parallel.groups import default_extension_cache


def test_extension_cache_defaults_to_the_venv(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "elsewhere"))
    assert default_extension_cache() == str(tmp_path / "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")


def test_extension_cache_keeps_an_explicit_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "elsewhere"))
    assert default_extension_cache() == str(tmp_path / "mine")


def test_extension_cache_left_to_torch_outside_a_venv(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    assert default_extension_cache() is None
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
