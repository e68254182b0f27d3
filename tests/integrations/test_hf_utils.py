"""Collation with a domain column, domain inference and the exact JSON round trip of reweighter state."""

from __future__ import annotations

import json

import pytest
import torch

from mixsel.integrations.hf_utils import (
    CausalLMCollator,
    DomainCollator,
    domain_id_of,
    from_jsonable,
    infer_domains,
    to_jsonable,
)


def test_causal_lm_collator_pads_right_with_ignore_labels():
    batch = CausalLMCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_domain_collator_maps_names_and_keeps_ids():
    inner = CausalLMCollator()
    rows = [{"input_ids": [1, 2], "domain": "math"}, {"input_ids": [3], "domain": "code"}]
    batch = DomainCollator(inner, "domain", ["code", "math"])(rows)
    assert batch["domain"].tolist() == [1, 0] and batch["domain"].dtype == torch.long
    ids = DomainCollator(inner, "domain", None)([{"input_ids": [1], "domain": 2}, {"input_ids": [1], "domain": 0}])
    assert ids["domain"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="not in SelectionTrainingArguments.domains"):
        DomainCollator(inner, "domain", ["code"])(rows)
    with pytest.raises(ValueError, match="set SelectionTrainingArguments.domains"):
        domain_id_of("math", None, "domain")
    with pytest.raises(ValueError, match="out of range"):
        domain_id_of(3, ["a", "b"], "domain")


def test_infer_domains():
    assert infer_domains(["b", "a", "b"]) == ["a", "b"]
    assert infer_domains([2, 0, torch.tensor(1)]) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="mixes types"):
        infer_domains(["a", 1])


def test_json_round_trip_is_exact():
    state = {
        "weights": torch.tensor([1 / 3, 2 / 3], dtype=torch.float64),
        "pending": {"counts": torch.tensor([[1.0, 2.0]]), "step": 3},
        "last": None,
        "ids": torch.tensor(5),
    }
    back = from_jsonable(json.loads(json.dumps(to_jsonable(state))))
    assert torch.equal(back["weights"], state["weights"]) and back["weights"].dtype == torch.float64
    assert torch.equal(back["pending"]["counts"], state["pending"]["counts"]) and back["pending"]["step"] == 3
    assert back["last"] is None and back["ids"].shape == () and int(back["ids"]) == 5
