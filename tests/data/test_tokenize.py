"""Tokenisation with prompt masking, truncation rules, and padded collation."""

from __future__ import annotations

import pytest
import torch

from mixsel.data.tokenize import IGNORE_INDEX, DomainCounts, Mixture, TokenizedSplit, tokenize_records

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
    assert split.prompts == ["what is two plus three\n"]  # the separator (a newline, which this tokenizer skips)
    assert split.answers == ["5"]
    assert split.num_targets().tolist() == [2]


def test_plain_text_truncation_drops_eos_when_it_does_not_fit(tok):
    text = "a b c d e f"
    split = tokenize_records([{"domain": "x", "text": text}], tok, domains=["x"], max_length=4, add_bos=True)
    assert split.input_ids[0].tolist() == [BOS, *ids(tok, "a b c")]
    fits = tokenize_records([{"domain": "x", "text": "a b"}], tok, domains=["x"], max_length=4, add_bos=True)
    assert fits.input_ids[0].tolist() == [BOS, *ids(tok, "a b"), EOS]


def test_right_truncation_cuts_the_response(tok):
    rec = {"domain": "x", "prompt": "a b", "response": "c d e f"}
    split = tokenize_records([rec], tok, domains=["x"], max_length=5, truncation="right")
    assert split.input_ids[0].tolist() == ids(tok, "a b c d e")
    assert split.labels[0].tolist() == [M, M, *ids(tok, "c d e")]


def test_right_truncation_of_a_long_prompt_keeps_bos_and_one_target(tok):
    rec = {"domain": "x", "prompt": "a b c d e f", "response": "g h"}
    split = tokenize_records([rec], tok, domains=["x"], max_length=4, add_bos=True, truncation="right")
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


# ---- truncation modes and their counts ----------------------------------------------------------

LONG = [
    {"domain": "x", "prompt": "a b", "response": "c"},  # fits
    {"domain": "x", "prompt": "a b c d e f", "response": "g h"},  # long prompt
    {"domain": "x", "prompt": "a", "response": "b c d e f g h"},  # the response alone is too long
    {"domain": "t", "text": "a b c d e f g"},  # long text
    {"domain": "t", "text": "a b"},
    {"domain": "x", "prompt": "a b c d e", "response": "f", "answer": "f"},  # long prompt, answer fits
    {"domain": "x", "prompt": "a", "response": "b c d e f g h", "answer": "h"},  # answer cannot fit
]


def test_left_truncation_keeps_the_response_and_counts_exactly(tok):
    split = tokenize_records(LONG, tok, domains=["t", "x"], max_length=6)
    rows = {tuple(x.tolist()): lab.tolist() for x, lab in zip(split.input_ids, split.labels)}
    d, e, f, g, h = ids(tok, "d e f g h")
    assert rows[(d, e, f, g, h, EOS)] == [M, M, M, g, h, EOS]  # the prompt lost "a b c" from the left
    a, b, c = ids(tok, "a b c")
    assert rows[(a, b, c, d, e, f)] == [M, b, c, d, e, f]  # one prompt token, then the response is cut
    assert rows[(b, c, d, e, f, EOS)] == [M, M, M, M, f, EOS]
    assert split.answers == [None, None, None, None, None, "f", None]  # the cut answer "h" is never scored
    assert split.counts["x"] == DomainCounts(
        rows=5, instruction=5, truncated=4, response_cut=2, dropped=0, scored=1, response_tokens_max=1
    )
    assert split.counts["t"] == DomainCounts(rows=2, truncated=1)


def test_drop_and_right_truncation_counts(tok):
    dropped = tokenize_records(LONG, tok, domains=["t", "x"], max_length=6, truncation="drop")
    assert len(dropped) == 3 and dropped.counts["x"] == DomainCounts(
        rows=1, instruction=1, truncated=4, response_cut=4, dropped=4
    )
    right = tokenize_records(LONG, tok, domains=["t", "x"], max_length=6, truncation="right")
    b, c, d, e, f, g = ids(tok, "b c d e f g")
    assert right.input_ids[1].tolist() == [b, c, d, e, f, g]
    assert right.counts["x"] == DomainCounts(rows=5, instruction=5, truncated=4, response_cut=4)
    assert right.answers[5] is None  # its eos was cut
    with pytest.raises(ValueError, match=r"data.truncation='middle' is not one of left, drop, right"):
        tokenize_records(LONG, tok, domains=["t", "x"], max_length=6, truncation="middle")


def test_answers_are_parsed_from_responses_without_an_answer_column(tok):
    recs = [
        {"domain": "x", "prompt": "a", "response": "so b\n#### 12"},
        {"domain": "x", "prompt": "a", "response": "thus $\\boxed{\\frac{1}{2}}$"},
        {"domain": "x", "prompt": "a", "response": "b", "answer": "7"},
        {"domain": "x", "prompt": "a", "response": "no marker"},
    ]
    split = tokenize_records(recs, tok, domains=["x"], max_length=32)
    assert split.answers == ["12", "\\frac{1}{2}", "7", None]
    assert split.counts["x"].scored == 3


# ---- formatting: separator, chat template, conversations ----------------------------------------


@pytest.fixture(scope="module")
def chat_tok():
    """The word-level tokenizer with three special tokens and a small chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    core = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>")
    )
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.add_special_tokens(specials[4:])
    t = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    t.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return t


USER, ASSISTANT, END = 4, 5, 6


def test_chat_template_masks_all_but_the_answer_and_its_end_token(chat_tok):
    rec = {"domain": "m", "prompt": "what is two plus three", "response": "five", "answer": "5"}
    split = tokenize_records([rec], chat_tok, domains=["m"], max_length=32)
    prompt = ids(chat_tok, "what is two plus three")
    five = ids(chat_tok, "five")[0]
    assert split.input_ids[0].tolist() == [USER, *prompt, END, ASSISTANT, five, END]  # no eos: the template ends
    assert split.labels[0].tolist() == [M] * 8 + [five, END]
    assert split.prompts == ["<|user|> what is two plus three <|end|> <|assistant|> "]
    plain = tokenize_records([rec], chat_tok, domains=["m"], max_length=32, chat_template=False)
    assert plain.input_ids[0].tolist() == [*prompt, five, EOS]


def test_conversations_with_and_without_a_chat_template(chat_tok):
    a, b, c, d = ids(chat_tok, "a b c d")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    rec = {"domain": "m", "messages": turns, "response": "d"}
    split = tokenize_records([rec], chat_tok, domains=["m"], max_length=32)
    expected = [USER, a, END, ASSISTANT, b, END, USER, c, END, ASSISTANT, d, END]
    assert split.input_ids[0].tolist() == expected
    assert split.labels[0].tolist() == [M] * 10 + [d, END]  # the earlier assistant turn is prompt: masked
    plain = tokenize_records([rec], chat_tok, domains=["m"], max_length=32, chat_template=False, separator=" is ")
    assert plain.prompts == ["a is b is c is "]  # turns joined by the separator, which also ends the prompt
    assert plain.labels[0].tolist()[-2:] == [d, EOS]


def test_a_chat_template_that_breaks_the_prefix_is_an_error(chat_tok):
    import copy

    odd = copy.deepcopy(chat_tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    odd.chat_template += "{% if add_generation_prompt %}x{% endif %}"  # the prompt ends with x, the answer doesn't
    with pytest.raises(ValueError, match=r"differently from the start of the whole conversation.*chat_template=false"):
        tokenize_records([{"domain": "m", "prompt": "a", "response": "b"}], odd, domains=["m"], max_length=8)


def test_embedded_tokenizer_with_a_chat_template():
    from mixsel.data.embedded import load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    assert tok.chat_template is None  # mixsel's default tokenizer has none: prompt + "\n" + response
    rec = {"domain": "m", "prompt": "What is 73 plus 79?", "response": "73 plus 79 is 152."}
    plain = tokenize_records([rec], tok, domains=["m"], max_length=64)
    assert tok.decode(plain.input_ids[0]) == "What is 73 plus 79?\n73 plus 79 is 152.<|endoftext|>"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    tok.chat_template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    split = tokenize_records([rec], tok, domains=["m"], max_length=64)
    seq, lab = split.input_ids[0], split.labels[0]
    start = int((lab != M).nonzero()[0])
    assert tok.decode(seq[:start]) == "<user>What is 73 plus 79?\n<assistant>"
    assert tok.decode(seq[start:]) == "73 plus 79 is 152.\n"


# ---- the old layout, byte for byte ---------------------------------------------------------------


def _old_layout(records, tok, max_length):
    """Token ids and prompt lengths as mixsel 0.1 made them (no separator, response cut on the right)."""
    eos = tok.eos_token_id
    out = []
    for r in records:
        if "text" in r:
            t = tok(r["text"], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            out.append(([*t, eos][:max_length], 0))
            continue
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        q = tok(r["response"], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] + [eos]
        if len(p) + len(q) <= max_length:
            out.append((p + q, len(p)))
        elif len(p) < max_length:
            out.append((p + q[: max_length - len(p)], len(p)))
        else:
            kept = p[len(p) - (max_length - 1) :]
            out.append((kept + q[:1], len(kept)))
    return out


@pytest.mark.parametrize("max_length", [48, 128])
def test_right_truncation_without_separator_reproduces_the_old_streams(max_length):
    from mixsel.data.embedded import load_embedded_records, load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    records = [r for r in load_embedded_records() if r["split"] != "train"]
    records += [r for r in load_embedded_records("train") if "prompt" in r][:400]
    domains = sorted({r["domain"] for r in records})
    split = tokenize_records(records, tok, domains=domains, max_length=max_length, truncation="right", separator="")
    old = _old_layout(records, tok, max_length)
    assert len(split) == len(old)
    for seq, lab, (ids_, prompt_len) in zip(split.input_ids, split.labels, old):
        assert seq.tolist() == ids_
        assert lab.tolist() == [M] * prompt_len + ids_[prompt_len:]
