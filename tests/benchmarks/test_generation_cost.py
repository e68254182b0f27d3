"""benchmarks/generation_cost.py: token-steps against hand-computed counts, and one short run."""

from __future__ import annotations

import json

import pytest

from _fast import FAST
from _scripts import load_script

generation_cost = load_script("benchmarks/generation_cost.py")


def test_token_steps_by_hand():
    steps = generation_cost.token_steps
    # one batch [3, 10, 1], chunks of 4 up to 10: 3 rows x 4, then the 10-token row alone for 4 and 2
    assert steps([3, 10, 1], batch_size=3, chunk=4, limit=10) == 12 + 4 + 2
    assert steps([3, 10, 1], batch_size=3, chunk=10, limit=10) == 30  # one call: every row to the longest
    # batches [3, 10] and [1]: 2 x 4 + 4 + 2, then 1 row for 1 token (generate stops when all ended)
    assert steps([3, 10, 1], batch_size=2, chunk=4, limit=10) == 8 + 4 + 2 + 1
    assert steps([3, 10, 1], batch_size=2, chunk=10, limit=10) == 20 + 1
    # a chunk ends early when its running rows all end inside it
    assert steps([5, 6], batch_size=2, chunk=4, limit=10) == 8 + 2 * 2


def test_one_short_run_writes_identical_texts(tmp_path):
    pytest.importorskip("transformers")
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 0\n")
    out = tmp_path / "generation_cost.json"
    overrides = [o for o in FAST if not o.startswith("eval.max_new_tokens")] + ["eval.max_new_tokens=6"]
    with pytest.warns(UserWarning, match="eval.max_new_tokens=6"):
        result = generation_cost.main(
            [
                "--config",
                str(config),
                "--per-domain",
                "3",
                "--batch-size",
                "2",
                "--chunk",
                "2",
                "--out",
                str(out),
                *overrides,
            ]
        )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["prompts"] == 6 and result["identical_texts"] == 6  # 3 arithmetic + 3 chemistry
    assert result["runs"]["one_call"]["scores"] == result["runs"]["drop_finished"]["scores"]
    assert result["runs"]["drop_finished"]["token_steps"] <= result["runs"]["one_call"]["token_steps"]
    assert set(result["domains"]) == {"arithmetic", "chemistry"}
