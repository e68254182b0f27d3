"""Tokenisation with prompt masking, truncation rules, and padded collation."""

from __future__ import annotations

import pytest
import torch

from mixsel.data.tokenize import IGNORE_INDEX, Mixture, TokenizedSplit, tokenize_records

WORDS = ["what", "is", "two", "plus", "three", "five", "the", "cat", "sat", "on", "mat", *"abcdefgh"]


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer built in memory: one token per whitespace-separated word."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def ids(tok, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


PAD, BOS, EOS = 0, 2, 3
M = IGNORE_INDEX


def test_plain_text_labels_equal_inputs_with_eos(tok):
    split = tokenize_records([{"domain": "b", "text": "the cat sat"}], tok, domains=["a", "b"], max_length=16)
    expected = [*ids(tok, "the cat sat"), EOS]
    assert split.input_ids[0].tolist() == expected
    assert split.labels[0].tolist() == expected
    assert split.domain_ids.tolist() == [1]
    assert split.prompts == [None]
    assert split.answers == [None]


def test_prompt_tokens_are_masked_at_exact_positions(tok):
    rec = {"domain": "m", "prompt": "what is two plus three", "response": "five", "answer": "5"}
    split = tokenize_records([rec], tok, domains=["m"], max_length=16, add_bos=True)
    prompt = ids(tok, "what is two plus three")
    assert split.input_ids[0].tolist() == [BOS, *prompt, ids(tok, "five")[0], EOS]
    assert split.labels[0].tolist() == [M] * 6 + [ids(tok, "five")[0], EOS]
    assert split.prompts == ["what is two plus three"]
    assert split.answers == ["5"]
    assert split.num_targets().tolist() == [2]


def test_plain_text_truncation_drops_eos_when_it_does_not_fit(tok):
    text = "a b c d e f"
    split = tokenize_records([{"domain": "x", "text": text}], tok, domains=["x"], max_length=4, add_bos=True)
    assert split.input_ids[0].tolist() == [BOS, *ids(tok, "a b c")]
    fits = tokenize_records([{"domain": "x", "text": "a b"}], tok, domains=["x"], max_length=4, add_bos=True)
    assert fits.input_ids[0].tolist() == [BOS, *ids(tok, "a b"), EOS]


def test_long_response_is_cut_on_the_right(tok):
    rec = {"domain": "x", "prompt": "a b", "response": "c d e f"}
    split = tokenize_records([rec], tok, domains=["x"], max_length=5)
    assert split.input_ids[0].tolist() == ids(tok, "a b c d e")
    assert split.labels[0].tolist() == [M, M, *ids(tok, "c d e")]


def test_long_prompt_is_cut_from_the_left_keeping_bos_and_one_target(tok):
    rec = {"domain": "x", "prompt": "a b c d e f", "response": "g h"}
    split = tokenize_records([rec], tok, domains=["x"], max_length=4, add_bos=True)
    assert split.input_ids[0].tolist() == [BOS, *ids(tok, "e f g")]
    assert split.labels[0].tolist() == [M, M, M, ids(tok, "g")[0]]


def test_examples_without_targets_are_dropped_with_a_count(tok):
    records = [
        {"domain": "x", "text": "a b"},
        {"domain": "x", "text": "a"},
        {"domain": "y", "text": "b"},
    ]
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 examples with no target token"):
        split = tokenize_records(records, tok, domains=["x", "y"], max_length=8, add_eos=False)
    # without eos, one-word texts are one-token sequences: nothing to predict
    assert split.input_ids[0].tolist() == ids(tok, "a b")
    assert len(split) == 1
    kept = tokenize_records(records, tok, domains=["x", "y"], max_length=8)
    assert len(kept) == 3  # with eos every example has a target


def test_domain_ids_counts_and_indices(tok):
    records = [{"domain": d, "text": "a b"} for d in ["c", "a", "c", "b", "c"]]
    split = tokenize_records(records, tok, domains=["a", "b", "c"], max_length=8)
    assert split.domain_ids.tolist() == [2, 0, 2, 1, 2]
    assert split.domain_counts().tolist() == [1, 1, 3]
    assert split.indices_of(2).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="out of range"):
        split.indices_of(3)


def test_collate_pads_right_and_masks_padding(tok):
    records = [
        {"domain": "x", "text": "a b c"},
        {"domain": "y", "prompt": "d", "response": "e"},
    ]
    split = tokenize_records(records, tok, domains=["x", "y"], max_length=8)
    a, b, c, d, e = ids(tok, "a b c d e")
    batch = split.collate(torch.tensor([1, 0, 1]), pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[d, e, EOS, PAD], [a, b, c, EOS], [d, e, EOS, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[M, e, EOS, M], [a, b, c, EOS], [M, e, EOS, M]]
    assert batch["domain_ids"].tolist() == [1, 0, 1]
    assert batch["index"].tolist() == [1, 0, 1]
    wide = split.collate([0], pad_token_id=PAD, pad_to_multiple_of=8)
    assert wide["input_ids"].shape == (1, 8)
    assert wide["labels"][0, 4:].tolist() == [M] * 4
    empty = split.collate([], pad_token_id=PAD)
    assert empty["input_ids"].shape == (0, 0)
    for bad in ([2], [-1]):
        with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
            split.collate(bad, pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad token"):
        split.collate([0], pad_token_id=None)  # type: ignore[arg-type]


def test_batch_api_matches_one_by_one(tok):
    texts = ["the cat sat on the mat", "a b", "what is two"]
    split = tokenize_records([{"domain": "x", "text": t} for t in texts], tok, domains=["x"], max_length=5)
    for i, t in enumerate(texts):
        assert split.input_ids[i].tolist() == [*tok(t, add_special_tokens=False)["input_ids"], EOS][:5]


def test_progress_bar_path_gives_same_result(tok):
    records = [{"domain": "x", "text": "a b c"}] * 3
    quiet = tokenize_records(records, tok, domains=["x"], max_length=8, progress=False)
    shown = tokenize_records(records, tok, domains=["x"], max_length=8, progress=True)
    assert [t.tolist() for t in quiet.input_ids] == [t.tolist() for t in shown.input_ids]


def test_errors(tok):
    with pytest.raises(ValueError, match=r"domain 'z', which is not among domains=\['x'\]"):
        tokenize_records([{"domain": "z", "text": "a"}], tok, domains=["x"], max_length=8)
    with pytest.raises(ValueError, match=r"neither 'text' nor 'prompt' \+ 'response'"):
        tokenize_records([{"domain": "x", "prompt": "a"}], tok, domains=["x"], max_length=8)
    with pytest.raises(ValueError, match=r"max_length must be at least 2"):
        tokenize_records([{"domain": "x", "text": "a"}], tok, domains=["x"], max_length=1)
    saved = tok.bos_token
    tok.bos_token = None
    try:
        with pytest.raises(ValueError, match=r"add_bos=True but the tokenizer has no bos token"):
            tokenize_records([{"domain": "x", "text": "a"}], tok, domains=["x"], max_length=8, add_bos=True)
    finally:
        tok.bos_token = saved


def test_mixture_checks_domains(tok):
    split = tokenize_records([{"domain": "x", "text": "a b"}], tok, domains=["x"], max_length=8)
    mix = Mixture(domains=["x"], train=split, validation=split, test=split)
    assert mix.train is split
    with pytest.raises(ValueError, match="differ from the mixture"):
        Mixture(domains=["x", "y"], train=split, validation=split, test=split)


def test_empty_records_give_an_empty_split(tok):
    split = tokenize_records([], tok, domains=["x", "y"], max_length=8)
    assert len(split) == 0
    assert split.domain_counts().tolist() == [0, 0]
    assert split.indices_of(1).tolist() == []


def test_tokenized_split_validates_lengths():
    with pytest.raises(ValueError, match="disagree in length"):
        TokenizedSplit(domains=["x"], domain_ids=torch.tensor([0, 0]), input_ids=[torch.tensor([1, 2])], labels=[])
