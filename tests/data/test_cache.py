"""The on-disk cache of tokenised mixtures is read with weights_only=True: a planted file runs no code."""

from __future__ import annotations

import logging

import pytest
import torch

import _mixture
from mixsel.config import DataConfig

pytest.importorskip("transformers")


class _Payload:
    """Pickles to a call that would create ``marker`` if it were ever unpickled unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_cache_file_runs_no_code_and_is_rebuilt(tmp_path, caplog):
    from mixsel.data import build
    from mixsel.data.embedded import load_embedded_tokenizer

    cfg = DataConfig(source=str(_mixture.write(tmp_path / "mix.jsonl")), max_length=64)
    cache = tmp_path / "cache"
    build._MEMO.clear()
    first = build.load_mixture(cfg, load_embedded_tokenizer(), cache_dir=str(cache))
    (path,) = cache.glob("mixture-*.pt")
    marker = tmp_path / "pwned"
    torch.save({"mixture": _Payload(str(marker))}, path)  # a hostile file under the cache's name

    build._MEMO.clear()
    with caplog.at_level(logging.WARNING, logger="mixsel.data.build"):
        again = build.load_mixture(cfg, load_embedded_tokenizer(), cache_dir=str(cache))
    assert not marker.exists()  # the payload never ran
    assert "ignoring the tokenised-mixture cache" in caplog.text
    assert again.summary == first.summary  # tokenised again ...
    build._MEMO.clear()
    assert build.load_mixture(cfg, load_embedded_tokenizer(), cache_dir=str(cache)).summary == first.summary
    assert "ignoring" not in caplog.text.split("tokenising again", 1)[1]  # ... and the cache replaced
