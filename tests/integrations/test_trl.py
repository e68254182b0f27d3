"""SelectionSFTTrainer on a tiny Llama with a chat-template tokenizer: TRL's data preparation, loss and
metrics kept; selection from pools; anchors from the prepared eval set; padding-free; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mixsel.data.embedded import load_embedded_tokenizer  # noqa: E402
from mixsel.integrations.hf import ReweightingCallback  # noqa: E402
from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer, token_weights  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

DOMAINS = ["chem", "math", "text"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer():
    """The embedded BPE tokenizer with a small chat template (no hub access)."""
    tok = load_embedded_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def conversations(n: int = 24) -> datasets.Dataset:
    rows = []
    for i in range(n):
        question = f"What is {i} plus {i + 1}?" if i % 3 else f"Name element {i}."
        answer = f"{i} plus {i + 1} is {2 * i + 1}." + " Indeed." * (i % 4)
        rows.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "domain": DOMAINS[i % 3],
            }
        )
    return datasets.Dataset.from_list(rows)


def prompt_completions(n: int = 24) -> datasets.Dataset:
    rows = [
        {"prompt": f"Q: what is {i} times 2? A:", "completion": f" {2 * i}" + " ok" * (i % 3), "domain": DOMAINS[i % 3]}
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def make_args(tmp_path, **overrides) -> SelectionSFTConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        pool_factor=3,
        max_steps=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return SelectionSFTConfig(**base)


def make_trainer(tmp_path, train, val=None, **overrides) -> SelectionSFTTrainer:
    tok = chat_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.train()
    return SelectionSFTTrainer(
        model=model, args=make_args(tmp_path, **overrides), train_dataset=train, eval_dataset=val, processing_class=tok
    )


def spy_on(trainer: SelectionSFTTrainer) -> list:
    """Record every (pool, selection) the OnlineSelector returns."""
    seen = []
    inner = trainer.online

    class Spy:
        def __call__(self, model, batch, k, **kw):
            result = inner(model, batch, k, **kw)
            seen.append(({key: v.detach().cpu() for key, v in batch.items()}, result.selection, kw.get("val_batch")))
            return result

        def __getattr__(self, name):
            return getattr(inner, name)

    trainer.online = Spy()
    return seen


def test_partitionsel_on_chat_data_keeps_trl_metrics_and_anchors_from_prepared_eval(tmp_path):
    # the failure: anchors from the raw, untokenised eval set ("examples need an 'input_ids' column")
    trainer = make_trainer(tmp_path, conversations(), conversations(6), selector="partitionsel", reweighter="uniform")
    seen = spy_on(trainer)
    out = trainer.train()
    assert math.isfinite(out.training_loss) and trainer.state.global_step == 3
    assert len(seen) == 3
    tok = trainer.processing_class
    for pool, selection, anchors in seen:
        assert pool["input_ids"].shape[0] == 12 and len(selection.indices) == 4
        # the chat template was applied (TRL's preparation), and the domain column reached the selector
        text = tok.decode(pool["input_ids"][0][pool["attention_mask"][0].bool()])
        assert text.startswith("<|user|>") and "<|assistant|>" in text
        assert set(pool["domain_ids"].tolist()) <= {0, 1, 2}
        assert anchors is not None and anchors["input_ids"].shape[0] == trainer.args.val_anchors
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for row in logged:
        for key in ("mean_token_accuracy", "entropy", "num_tokens", "time/select", "select/frac/chem", "weights/math"):
            assert key in row, key
    # num_tokens counts the selected rows only (4 per step), not the pools of 12
    pool_tokens = sum(int(pool["attention_mask"].sum()) for pool, _, _ in seen)
    assert 0 < logged[-1]["num_tokens"] < pool_tokens
    metrics = trainer.evaluate()  # TRL's eval metrics too; the domain column never reaches the model
    assert math.isfinite(metrics["eval_loss"]) and "eval_mean_token_accuracy" in metrics


def test_colm_on_prompt_completion_padding_free(tmp_path):
    trainer = make_trainer(
        tmp_path,
        prompt_completions(),
        prompt_completions(6),
        selector="colm",
        padding_free=True,
        max_length=None,
        reweighter="static",
        reweighter_options={"weights": [1, 2, 1], "mode": "loss"},
    )
    seen = spy_on(trainer)
    trained = []
    original = trainer._micro_inputs

    def record(micro):
        batch = original(micro)
        trained.append(batch)
        return batch

    trainer._micro_inputs = record
    out = trainer.train()
    assert math.isfinite(out.training_loss) and len(seen) == 3
    for (pool, selection, _), batch in zip(seen, trained):
        # completion-only loss (TRL's default for prompt/completion): every pool row has masked prompt tokens
        assert bool((pool["labels"][:, 1] == -100).all())
        # the selected rows reached the model flattened into one padding-free row
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
        lengths = pool["attention_mask"][selection.indices].sum().item()
        assert batch["input_ids"].shape[1] == lengths
    assert "mean_token_accuracy" in trainer.state.log_history[0]


def _hand_loss(model, batch, weights):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    mask = labels != -100
    sums, counts = (nll * mask).sum(1), mask.sum(1)
    return (weights * sums).sum() / (weights * counts).sum(), sums / counts


def _micro(trainer, padded, domains, w):
    """A micro-batch of ``padded`` rows with weights ``w`` in a fresh plan (normalised over itself)."""
    from mixsel.engine import Batch, MicroBatch

    plan = trainer.engine.plan(trainer.model, step=0, lr=1e-3)
    plan.token_losses = [None]
    trainer._plan, trainer._token_total = plan, None
    return MicroBatch(Batch.from_dict({**padded, "domain_ids": domains}), w, 0)


def test_weighted_loss_is_trls_token_loss_with_example_weights(tmp_path):
    trainer = make_trainer(tmp_path, conversations(), padding_free=True, max_length=None)
    model = trainer.model
    rows = [trainer.train_dataset[i] for i in range(5)]
    padded = trainer.data_collator(rows)  # the pool collator: padded rows (domain kept)
    domains = padded.pop("domain")
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0])
    expected, per_example = _hand_loss(model, padded, w)

    micro = _micro(trainer, padded, domains, w)
    loss = trainer._weighted_loss(model, dict(padded), micro, False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trainer._plan.token_losses[0], per_example, rtol=1e-5, atol=1e-6)

    # padding-free: the same rows flattened by TRL's collator give the same loss and per-example losses
    micro = _micro(trainer, padded, domains, w)
    flat = trainer._micro_inputs(micro)
    flat.pop("mixsel_micro")
    loss_flat = trainer._weighted_loss(model, flat, micro, False)
    torch.testing.assert_close(loss_flat, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainer._plan.token_losses[0], per_example, rtol=1e-4, atol=1e-5)

    # unit weights: exactly TRL's own loss
    from trl import SFTTrainer

    ones = trainer._weighted_loss(model, dict(padded), _micro(trainer, padded, domains, torch.ones(5)), False)
    torch.testing.assert_close(ones, SFTTrainer.compute_loss(trainer, model, dict(padded)))


def test_token_weights_normalise_to_the_token_mean():
    rows = torch.tensor([[0, 0, 0], [1, 1, 1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    mult, counts = token_weights(torch.tensor([1.0, 3.0]), rows, mask)
    assert counts.tolist() == [2.0, 3.0]
    # m_i = w_i N / sum_j w_j n_j = w_i * 5 / 11
    torch.testing.assert_close(mult[:, 0], torch.tensor([5 / 11, 15 / 11]))


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="packing"):
        make_trainer(tmp_path, conversations(), packing=True, max_length=32)
    with pytest.raises(ValueError, match="loss_type"):
        make_trainer(tmp_path, conversations(), loss_type="dft")
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(TypeError, match="SelectionSFTConfig"):
        SelectionSFTTrainer(
            model=make_tiny_llama(vocab_size=4096), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
        )

    # a ReweightingCallback on a plain SFTTrainer is an error, not a silent no-op
    tok = chat_tokenizer()
    plain = SFTTrainer(
        model=make_tiny_llama(vocab_size=len(tok)),
        args=SFTConfig(
            output_dir=str(tmp_path / "plain"), max_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no"
        ),
        train_dataset=conversations(8).remove_columns("domain"),
        processing_class=tok,
        callbacks=[ReweightingCallback("uniform", DOMAINS)],
    )
    with pytest.raises(TypeError, match="ReweightingCallback"):
        plain.train()


def test_raw_selection_val_dataset_is_prepared_like_the_eval_set(tmp_path):
    with pytest.raises(ValueError, match="need validation examples"):
        make_trainer(tmp_path, conversations(), selector="partitionsel")  # no eval set, no anchors
    tok = chat_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    trainer = SelectionSFTTrainer(
        model=model,
        args=make_args(tmp_path, selector="partitionsel"),
        train_dataset=conversations(),
        processing_class=tok,
        selection_val_dataset=conversations(6),
    )
    val = trainer.selection_val_dataset
    assert "input_ids" in val.column_names and "domain" in val.column_names
    assert tok.decode(val[0]["input_ids"]).startswith("<|user|>")
    batch = trainer._anchor_batch(0)
    assert batch["input_ids"].shape[0] == trainer.args.val_anchors and "domain" not in batch


def test_dograph_takes_domain_gradients_from_a_separate_pass(tmp_path):
    """TRL computes the loss itself, so DoGraph's domain gradients come from bookkeeping.domain_gradients
    over the trained rows (no in-backward capture); the weights move and stay a distribution."""
    from mixsel import bookkeeping

    calls = []
    real = bookkeeping.domain_gradients

    def counted(*args, **kwargs):
        calls.append(args[1]["input_ids"].shape[0])
        return real(*args, **kwargs)

    trainer = make_trainer(
        tmp_path, conversations(), conversations(6), selector="random", reweighter="dograph", reweighter_options={}
    )
    assert trainer._capture_gradients is False
    bookkeeping.domain_gradients, saved = counted, real
    try:
        out = trainer.train()
    finally:
        bookkeeping.domain_gradients = saved
    assert math.isfinite(out.training_loss)
    assert calls == [4, 4, 4]  # one pass per step over the 4 trained rows
    rw = trainer.reweighting_callback.reweighter
    assert rw.num_calls == 3 and torch.isclose(rw.weights.sum(), torch.tensor(1.0, dtype=rw.weights.dtype))


def test_config_on_a_machine_without_a_bf16_gpu_turns_bf16_off(tmp_path, caplog):
    """TRL's bf16 default would refuse to start without a bf16 GPU; the mixsel config turns it off, with a line."""
    from mixsel.integrations import trl as mixsel_trl

    if mixsel_trl._has_bf16_accelerator():
        pytest.skip("this machine has a bf16 accelerator")
    with caplog.at_level("WARNING", logger="mixsel"):
        args = mixsel_trl.SelectionSFTConfig(output_dir=str(tmp_path), report_to=[])
    assert args.bf16 is False and any("bf16 off" in r.getMessage() for r in caplog.records)
    forced = mixsel_trl.SelectionSFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=True)
    assert forced.bf16 is True  # an explicit choice is kept
