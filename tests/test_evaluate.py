"""Exact match by batched greedy generation against one-at-a-time decoding, and per-domain losses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")


def _split_and_model():
    from mixsel.config import DataConfig, ModelConfig
    from mixsel.data.build import load_mixture
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.model import build_model

    tok = load_embedded_tokenizer()
    mix = load_mixture(DataConfig(max_length=64, max_train_per_domain=10, val_per_domain=4, test_per_domain=4), tok)
    torch.manual_seed(0)
    model = build_model(ModelConfig(config_file="embedded:micro-llama", attn_implementation="eager"), tok).eval()
    return tok, mix.test, model


def test_batched_generation_equals_single():
    import _checkers
    from mixsel.evaluate import exact_match

    tok, split, model = _split_and_model()
    seen: dict[int, list[tuple[str, str]]] = {}

    def record(batch_size):
        _checkers.CALLS.clear()
        out = exact_match(
            model, tok, split, limit=5, max_new_tokens=6, batch_size=batch_size, checker="_checkers:accept"
        )
        seen[batch_size] = list(_checkers.CALLS)
        return out

    with pytest.warns(UserWarning, match=r"eval.max_new_tokens=6 is shorter than"):
        batched, single = record(5), record(1)
    assert batched == single and all(v == 1.0 for k, v in batched.items() if "exact_match" in k)
    assert seen[5] == seen[1] and len(seen[1]) >= 5
    # with a greedy decode of an untrained model the real scorer finds nothing right
    with pytest.warns(UserWarning, match=r"eval.max_new_tokens=4"):
        out = exact_match(model, tok, split, limit=3, max_new_tokens=4)
    assert all(v == 0.0 for k, v in out.items() if "exact_match" in k)


def test_domain_losses_match_manual():
    from mixsel.evaluate import domain_losses
    from mixsel.features.loss import per_example_loss

    tok, split, model = _split_and_model()
    out = domain_losses(model, split, pad_token_id=tok.pad_token_id, batch_size=3, max_per_domain=4, prefix="t")
    d = 0
    idx = split.indices_of(d)[:4]
    batch = split.collate(idx, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = float(per_example_loss(logits, batch["labels"]).mean())
    assert out[f"t/loss/{split.domains[d]}"] == pytest.approx(expected, rel=1e-5)
    assert out["t/loss_worst"] == max(v for k, v in out.items() if k.startswith("t/loss/"))


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy "generation" is a scripted answer for each prompt it knows."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script, self.prompts = tokenizer, script, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            answer = next(text for key, text in self.script.items() if key in prompt)
            ended = [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
            rows.append(ids.tolist() + ended)
        width = max(map(len, rows))
        sequences = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return SimpleNamespace(sequences=sequences, cache=None, past_key_values=None)


def test_exact_match_per_domain_with_sympy_a_user_checker_and_unscorable_prompts(tmp_path):
    import _checkers
    import _mixture
    from mixsel.config import DataConfig, EvalConfig
    from mixsel.data.build import load_mixture
    from mixsel.data.embedded import load_embedded_tokenizer
    from mixsel.evaluate import answer_checkers, exact_match

    tok = load_embedded_tokenizer()
    mix = load_mixture(DataConfig(source=str(_mixture.write(tmp_path / "mix.jsonl")), max_length=64), tok)
    script = {
        "diagonals": "Each of n vertices...\n#### \\frac{n(n-3)}{2}",  # sympy: equal to n(n-3)/2
        "Solve 4x": "so x is\n#### -0.75",  # = x = -3/4; the prompt was cut from the left, the answer fits
        "one half": "#### 0.5",  # = \frac{1}{2}
        "Half of one": "#### 0.5",  # its reference does not fit max_length: never asked
        "2+2": "It is 4",  # the user checker compares last words with the parsed answer "4"
        "3+3": "It is 7",
        "6 * 2": " 12\n#### 12",  # gsm8k
    }
    model = ScriptedLM(tok, script)
    checker = {"algebra": "sympy", "chat": "_checkers:same_last_word", "*": "gsm8k"}
    _checkers.CALLS.clear()
    with pytest.warns(
        UserWarning, match=r"max_new_tokens=8 is shorter than 3 of the 3 reference responses of domain 'algebra'"
    ):
        out = exact_match(model, tok, mix.test, max_new_tokens=8, checker=checker, prefix="test")
    assert {k: v for k, v in out.items() if "exact_match" in k} == pytest.approx(
        {
            "test/exact_match/algebra": 1.0,
            "test/exact_match/chat": 0.5,
            "test/exact_match/trl": 1.0,
            "test/exact_match_mean": 2.5 / 3,
        }
    )
    assert not any("Half of one" in p for p in model.prompts)  # unscorable: never generated
    assert not any("Name a fruit" in p for p in model.prompts)  # no answer in its completion
    assert sorted(ref for _, ref in _checkers.CALLS) == ["4", "6"]  # answers parsed from "#### <answer>"
    assert (
        answer_checkers(EvalConfig(answer_checker=checker), mix.domains)["trl"]
        is answer_checkers(EvalConfig(), mix.domains)["trl"]
    )  # both gsm8k


def test_mixsel_train_scores_with_the_configured_checker(tmp_path):
    import _checkers
    from mixsel.config import load_config
    from mixsel.train import train

    from _fast import FAST

    _checkers.CALLS.clear()
    cfg = [
        *FAST,
        f"train.output_dir={tmp_path}",
        "train.max_steps=1",
        "eval.answer_checker={chemistry: _checkers:accept}",
    ]
    result = train(load_config(None, cfg), progress=False)
    assert result["test/exact_match/chemistry"] == 1.0  # every chemistry prompt went to the user's checker
    from mixsel.answers import PROBE_PAIR

    assert _checkers.CALLS[0] == PROBE_PAIR  # called once at start, before any step trained
    del _checkers.CALLS[0]
    assert len(_checkers.CALLS) == 2  # eval.exact_match=2 prompts
    assert result["test/exact_match_mean"] == pytest.approx((1.0 + result["test/exact_match/arithmetic"]) / 2)
    # every scored prompt's generation is kept in the run folder, consistent with the scores
    import json

    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert sorted(r["domain"] for r in records) == ["arithmetic", "arithmetic", "chemistry", "chemistry"]
    assert [r["generated"] for r in records if r["domain"] == "chemistry"] == [p for p, _ in _checkers.CALLS]
    for name in ("arithmetic", "chemistry"):
        rows = [r for r in records if r["domain"] == name]
        assert result[f"test/exact_match/{name}"] == sum(r["correct"] for r in rows) / 2
        assert result[f"test/generation/tokens/{name}"] == sum(r["new_tokens"] for r in rows) / 2


@pytest.mark.parametrize("chunk", [1, 2, 5, 16])
def test_greedy_generate_drops_finished_rows_and_keeps_every_token(chunk):
    """greedy_generate against one uninterrupted model.generate of the same left-padded batch."""
    from mixsel.evaluate import _prompt_ids, greedy_generate

    tok, split, model = _split_and_model()
    prompts = [_prompt_ids(split, i) for i in range(len(split)) if split.prompts[i]][:6]
    width = max(p.numel() for p in prompts)
    ids = torch.full((6, width), tok.pad_token_id)
    mask = torch.zeros((6, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - p.numel() :], mask[r, width - p.numel() :] = p, 1
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: an untrained model repeats one token
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, width:].tolist()

    def ends(token: int) -> list[int]:
        return [row.index(token) + 1 if token in row else 12 for row in free]

    # the end token: the one whose first occurrences end the rows at the most different lengths
    eos = max(sorted({t for row in free for t in row}), key=lambda t: len(set(ends(t))))
    assert len(set(ends(eos))) >= 3 and 12 in ends(eos)  # rows leave at different chunks; one never ends
    full = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )[:, width:].tolist()
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in full]
    got = greedy_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos, chunk=chunk)
    assert [g.tolist() for g in got] == expected
    assert [len(g) for g in got] == ends(eos)
    # without an end token every row runs to the limit
    no_end = greedy_generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0, chunk=chunk)
    assert [g.tolist() for g in no_end] == free


def test_generation_records_and_lengths_against_one_prompt_at_a_time():
    """records and generation/* metrics against decoding each prompt alone, without padding."""
    from mixsel.evaluate import _prompt_ids, exact_match

    tok, split, model = _split_and_model()
    arith = split.domains.index("arithmetic")
    first = next(int(i) for i in split.indices_of(arith) if split.answers[int(i)] is not None)
    ids = _prompt_ids(split, first)[None]
    # the end token is the first token the model generates after the first arithmetic prompt, so that
    # prompt's generation ends at once while the others (most likely) run to the limit
    first_token = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    eos = int(first_token[0, -1])

    class EndsEarly:  # the tokenizer with another end-of-sequence token
        eos_token_id = eos
        pad_token_id = tok.pad_token_id

        def decode(self, *args, **kwargs):
            return tok.decode(*args, **kwargs)

    records: list[dict] = []
    with pytest.warns(UserWarning, match="eval.max_new_tokens=5"):
        out = exact_match(model, EndsEarly(), split, limit=3, max_new_tokens=5, batch_size=3, records=records)
    assert len(records) == sum(1 for k in out if k.startswith("val/exact_match/")) * 3
    for rec in records:
        p = _prompt_ids(split, rec["row"])[None]
        gen = model.generate(
            input_ids=p,
            attention_mask=torch.ones_like(p),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )[0, p.shape[1] :].tolist()
        expected = gen[: gen.index(eos) + 1] if eos in gen else gen
        assert rec["new_tokens"] == len(expected) and rec["finished"] == (eos in gen)
        assert rec["generated"] == tok.decode(torch.tensor(expected), skip_special_tokens=True)
        assert rec["answer"] == split.answers[rec["row"]] and rec["correct"] is False
    assert next(r for r in records if r["row"] == first)["new_tokens"] == 1
    for name in {r["domain"] for r in records}:
        rows = [r for r in records if r["domain"] == name]
        assert out[f"val/generation/tokens/{name}"] == pytest.approx(sum(r["new_tokens"] for r in rows) / len(rows))
        assert out[f"val/generation/finished/{name}"] == pytest.approx(sum(r["finished"] for r in rows) / len(rows))
    assert out["val/generation/finished/arithmetic"] > 0


def test_generation_stated_counts_answers_in_the_reference_form():
    """generation/stated: the share of generations with a ``####`` line, per record and per domain."""
    from mixsel.evaluate import exact_match

    tok, split, model = _split_and_model()

    class MarksEvenLengths:  # decodes as the tokenizer, plus an answer line when the generation has even length
        eos_token_id = tok.eos_token_id
        pad_token_id = tok.pad_token_id

        def decode(self, ids, **kwargs):
            text = tok.decode(ids, **kwargs)
            return text + "\n#### 3" if len(ids) % 2 == 0 else text

    records: list[dict] = []
    with pytest.warns(UserWarning, match="eval.max_new_tokens"):
        out = exact_match(model, MarksEvenLengths(), split, limit=3, max_new_tokens=4, batch_size=3, records=records)
    assert records
    for rec in records:
        assert rec["stated"] == (rec["new_tokens"] % 2 == 0)
    for name in {r["domain"] for r in records}:
        rows = [r for r in records if r["domain"] == name]
        want = sum(r["new_tokens"] % 2 == 0 for r in rows) / len(rows)
        assert out[f"val/generation/stated/{name}"] == pytest.approx(want)
    assert any(r["stated"] for r in records)  # max_new_tokens=4: every unfinished row is marked
