"""SelectionTrainer on a tiny Llama: pools, selection, weighted loss, metrics, LoRA and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import TrainerCallback  # noqa: E402

from mixsel.integrations.hf import ReweightingCallback, SelectionTrainer, SelectionTrainingArguments  # noqa: E402
from mixsel.selection.budgets import budgets_from_weights, proportional_budgets  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

DOMAINS = ["a", "b", "c"]
SEQ = 10
MARK = 90  # input_ids[0] = MARK + domain id: lets a test recover a row's domain from its tokens


def make_dataset(n_per_domain=(12, 8, 4), names: bool = True, seed: int = 0):
    """Fixed-length rows; the first token encodes the domain, the first two tokens are prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "domain": []}
    for d, count in enumerate(n_per_domain):
        for _ in range(count):
            ids = torch.randint(1, 80, (SEQ,), generator=g)
            ids[0] = MARK + d
            labels = ids.clone()
            labels[:2] = -100
            rows["input_ids"].append(ids.tolist())
            rows["labels"].append(labels.tolist())
            rows["domain"].append(DOMAINS[d] if names else d)
    return datasets.Dataset.from_dict(rows)


def make_args(tmp_path, **overrides):
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
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return SelectionTrainingArguments(**base)


class Spy:
    """Records every pool the OnlineSelector sees with its selection, and every batch compute_loss sees."""

    def __init__(self, trainer: SelectionTrainer) -> None:
        self.pools: list[tuple[dict, object]] = []
        self.trained: list[torch.Tensor] = []
        online_call = trainer.online.__call__
        compute_loss = trainer.compute_loss

        def spy_online(model, batch, k, **kw):
            result = online_call(model, batch, k, **kw)
            self.pools.append(({key: v.detach().cpu() for key, v in batch.items()}, result.selection))
            return result

        def spy_loss(model, inputs, *a, **kw):
            if model.training:
                self.trained.append(inputs["input_ids"].detach().cpu())
            return compute_loss(model, inputs, *a, **kw)

        trainer.online = _Wrap(trainer.online, spy_online)
        trainer.compute_loss = spy_loss


class _Wrap:
    def __init__(self, inner, call):
        self._inner, self._call = inner, call

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_selection_trainer_stratified_full_model(tmp_path):
    model = make_tiny_llama()
    model.train()
    args = make_args(tmp_path, selector="stratified", domains=DOMAINS, reweighter="uniform")
    trainer = SelectionTrainer(model=model, args=args, train_dataset=make_dataset())
    spy = Spy(trainer)
    before = _params(model)
    out = trainer.train()

    assert math.isfinite(out.training_loss)
    assert len(spy.pools) == 3 and len(spy.trained) == 3
    for (pool, selection), trained in zip(spy.pools, spy.trained):
        # the domain column reached the selector, aligned with its rows (names mapped to ids)
        assert pool["input_ids"].shape[0] == 12
        assert torch.equal(pool["domain_ids"], pool["input_ids"][:, 0] - MARK)
        # stratified: the selected composition follows the proportional per-domain budgets
        chosen = pool["domain_ids"][selection.indices]
        counts = torch.bincount(pool["domain_ids"], minlength=3)
        assert torch.equal(torch.bincount(chosen, minlength=3), proportional_budgets(counts, 4))
        # the model trained on exactly the selected rows, and the domain column never reached forward
        assert torch.equal(trained, pool["input_ids"][selection.indices])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"])
        assert h["time/select"] >= 0
        assert math.isclose(sum(h[f"select/frac/{d}"] for d in DOMAINS), 1.0, rel_tol=1e-9)
        assert all(math.isclose(h[f"weights/{d}"], 1 / 3) for d in DOMAINS)


def test_weighted_loss_matches_hand_computed_mean(tmp_path):
    """compute_loss = the micro-batch's part of sum_i w_i l_i / sum_i w_i over the whole step, with l_i
    the per-example mean target-token CE and the normaliser summed over every micro-batch."""
    from mixsel.engine import Batch, MicroBatch

    model = make_tiny_llama()
    args = make_args(tmp_path, domains=DOMAINS)
    trainer = SelectionTrainer(model=model, args=args, train_dataset=make_dataset())
    batch = trainer.data_collator([make_dataset()[i] for i in (0, 13, 22)])
    domains = batch.pop("domain")
    w = torch.tensor([1.0, 2.0, 0.5])
    model.train()
    plan = trainer.engine.plan(model, step=0, lr=1e-3)
    plan.total_weight = torch.tensor(7.0)  # as if another micro-batch of the step weighed 3.5
    plan.token_losses = [None]
    trainer._plan = plan
    micro = MicroBatch(Batch.from_dict({**batch, "domain_ids": domains}), w, 0)
    loss = trainer.compute_loss(model, {**batch, "mixsel_micro": micro})
    # independent oracle: token-level cross-entropy per row with the causal shift
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    per = []
    for i in range(3):
        ce = torch.nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], reduction="none")
        mask = batch["labels"][i, 1:] != -100
        per.append(ce[mask].mean())
    expected = (torch.stack(per) * w).sum() / 7.0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # the recorded losses are per token (DoReMi's per-token excess), zero off the targets
    tokens = plan.token_losses[0]
    mask = batch["labels"][:, 1:] != -100
    assert tokens.shape == mask.shape and bool((tokens[~mask] == 0).all())
    torch.testing.assert_close(tokens.sum(1) / mask.sum(1), torch.stack(per), rtol=1e-5, atol=1e-6)


def test_selection_trainer_lora_int_domains(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    model.train()
    args = make_args(tmp_path, selector="stratified", selector_options='{"budget": "uniform"}')
    ds = make_dataset(names=False)
    trainer = SelectionTrainer(
        model=model, args=args, train_dataset=ds, eval_dataset=make_dataset((2, 2, 2), names=False, seed=1)
    )
    assert trainer.domains == ["0", "1", "2"]  # inferred from integer ids
    spy = Spy(trainer)
    before = _params(model)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert len(spy.pools) == 3
    for pool, selection in spy.pools:
        counts = torch.bincount(pool["domain_ids"], minlength=3)
        got = torch.bincount(pool["domain_ids"][selection.indices], minlength=3)
        # budget="uniform": equal shares over the domains present in the pool, capped by availability
        assert torch.equal(got, budgets_from_weights(counts, 4, (counts > 0).double()))
        assert int(got.sum()) == 4 and bool((got <= counts).all())
        uncapped = got[(got < counts)]
        assert uncapped.numel() == 0 or int(uncapped.max() - uncapped.min()) <= 1
    after = dict(model.named_parameters())
    lora_changed = [n for n in before if "lora_" in n and not torch.equal(after[n].detach(), before[n])]
    frozen_changed = [n for n in before if "lora_" not in n and not torch.equal(after[n].detach(), before[n])]
    assert lora_changed and not frozen_changed
    # evaluation pops the domain column too
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="pool_factor"):
        make_args(tmp_path, pool_factor=0)
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="not in SelectionTrainingArguments.domains"):
        trainer = SelectionTrainer(
            model=model, args=make_args(tmp_path, domains=["a", "b"]), train_dataset=make_dataset()
        )
        trainer.train()
    with pytest.raises(ValueError, match="reference_model"):
        SelectionTrainer(model=model, args=make_args(tmp_path, reweighter="doremi", domains=DOMAINS))
    with pytest.raises(TypeError, match="SelectionTrainingArguments"):
        from transformers import TrainingArguments

        SelectionTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _doremi_trainer(tmp_path, name, callbacks=()):
    args = make_args(
        tmp_path,
        output_dir=str(tmp_path / name),
        max_steps=4,
        selector="random",
        domains=DOMAINS,
        reweighter="doremi",
        reweighter_options={"step_size": 5.0},
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="linear",
    )
    return SelectionTrainer(
        model=make_tiny_llama(),
        args=args,
        train_dataset=make_dataset(),
        reference_model=make_tiny_llama(seed=1),
        callbacks=list(callbacks),
    )


def test_reweighter_state_restored_on_resume(tmp_path):
    full = _doremi_trainer(tmp_path, "full")
    full.train()
    ref_state = full.reweighting_callback.reweighter.state_dict()
    assert ref_state["num_calls"] == 4
    assert not torch.allclose(ref_state["weights"], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-4)

    part = _doremi_trainer(tmp_path, "part", callbacks=[_StopAt(2)])
    part.train()
    assert part.state.global_step == 2
    assert (tmp_path / "part" / "checkpoint-2").is_dir()

    resumed = _doremi_trainer(tmp_path, "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    state = resumed.reweighting_callback.reweighter.state_dict()
    assert state["num_calls"] == 4 and state["num_updates"] == 4
    torch.testing.assert_close(state["weights"], ref_state["weights"], rtol=0, atol=1e-10)
    for key in ("_weight_sum", "weight_sum"):
        if key in state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-10)
    for (n, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_callback_state_roundtrips_through_json():
    import json

    cb = ReweightingCallback("doremi", DOMAINS, {"step_size": 0.5})
    from mixsel.types import DomainStats

    cb.record(
        DomainStats(
            counts=torch.tensor([2.0, 1.0, 0.0]),
            loss_sum=torch.tensor([3.0, 2.5, 0.0]),
            ref_loss_sum=torch.tensor([2.0, 2.4, 0.0]),
            token_counts=torch.tensor([8.0, 3.0, 0.0]),
            excess_sum=torch.tensor([4.0, 0.6, 0.0]),
        )
    )
    cb.on_step_end(None, type("S", (), {"global_step": 1})(), None)
    state = json.loads(json.dumps(cb.state()))
    clone = ReweightingCallback.from_state(state)
    assert torch.equal(clone.weights, cb.weights)
    assert clone.reweighter.state_dict()["num_calls"] == 1
    assert not torch.equal(cb.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_gradient_accumulation_selects_once_per_optimiser_step(tmp_path):
    """With 2 accumulation steps one pool of pool_factor x (2 x 4) rows is drawn and one selection of 8
    made per optimiser step; its rows are trained in two micro-batches of 4."""
    model = make_tiny_llama()
    args = make_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, domains=DOMAINS)
    trainer = SelectionTrainer(model=model, args=args, train_dataset=make_dataset())
    spy = Spy(trainer)
    out = trainer.train()
    assert [pool["input_ids"].shape[0] for pool, _ in spy.pools] == [24, 24]
    assert [len(selection) for _, selection in spy.pools] == [8, 8]
    assert [t.shape[0] for t in spy.trained] == [4, 4, 4, 4]
    for s, (pool, selection) in enumerate(spy.pools):
        trained = torch.cat(spy.trained[2 * s : 2 * s + 2])
        assert torch.equal(trained, pool["input_ids"][selection.indices])
    assert math.isfinite(out.training_loss)
    # each optimiser step logs the weighted mean over its 8 rows (the micro-batch parts add up)
    assert all(3.0 < h["loss"] < 6.0 for h in trainer.state.log_history if "loss" in h)


def test_dograph_runs_in_the_trainer_with_domain_gradients(tmp_path):
    """DoGraph declares needs_grad: the trainer feeds it projected domain gradients and a validation target."""
    args = make_args(
        tmp_path,
        max_steps=4,
        selector="random",
        domains=DOMAINS,
        reweighter="dograph",
        reweighter_options={"update_every": 2, "step_size": 5.0},
        reweighting_projection_dim=16,
        reweighting_val_per_domain=2,
        gradient_accumulation_steps=2,
    )
    trainer = SelectionTrainer(
        model=make_tiny_llama(), args=args, train_dataset=make_dataset(), eval_dataset=make_dataset(seed=1)
    )
    seen = []
    update = trainer.reweighting_callback.reweighter.update

    def spy(stats):
        seen.append(stats)
        return update(stats)

    trainer.reweighting_callback.reweighter.update = spy
    trainer.train()
    rw = trainer.reweighting_callback.reweighter
    # one update() call per optimiser step (micro-steps accumulated), the rule applied every 2 calls
    assert len(seen) == 4 and rw.num_calls == 4 and rw.num_updates == 2
    assert all(s.grad is not None and s.grad.shape == (3, 16) for s in seen)
    # the validation target is computed on the steps that end an update window (and the first)
    assert [s.val_grad is not None for s in seen] == [True, True, False, True]
    assert not torch.allclose(rw.weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6)


def test_dograph_in_the_trainer_needs_validation_rows(tmp_path):
    args = make_args(tmp_path, selector="random", domains=DOMAINS, reweighter="dograph")
    with pytest.raises(ValueError, match="reweighter 'dograph' need validation examples"):
        SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=make_dataset())


def test_anchors_source_sizes_and_weights_switch_follow_mixsel_train(tmp_path):
    """The HF trainer draws anchors with bookkeeping.draw_anchors, hands CoLM the dataset's sizes and
    resolves selection weights like mixsel train."""
    from mixsel import bookkeeping

    val = make_dataset((5, 4, 3), seed=1)
    args = make_args(tmp_path, selector="partitionsel", domains=DOMAINS, anchor_sampling="balanced", val_anchors=6)
    trainer = SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=make_dataset(), eval_dataset=val)
    batch = trainer._anchor_batch(step=2)
    assert batch["input_ids"].shape[0] == 6
    assert torch.bincount(batch["domain_ids"], minlength=3).tolist() == [2, 2, 2]  # round-robin over domains
    assert (batch["input_ids"][:, 0] - MARK).tolist() == batch["domain_ids"].tolist()
    assert trainer.online.features.source == "blocks" and trainer.online.features.normalize
    assert trainer._use_weights is False
    uniform_args = make_args(tmp_path, selector="partitionsel", domains=DOMAINS)
    uniform = SelectionTrainer(
        model=make_tiny_llama(), args=uniform_args, train_dataset=make_dataset(), eval_dataset=val
    )
    rows = bookkeeping.draw_anchors(12, 4, seed=0, step=2)
    assert (uniform._anchor_batch(step=2)["input_ids"][:, 0] - MARK).tolist() == [
        0 if r < 5 else 1 if r < 9 else 2 for r in rows.tolist()
    ]
    colm = SelectionTrainer(
        model=make_tiny_llama(),
        args=make_args(tmp_path, selector="colm", domains=DOMAINS),
        train_dataset=make_dataset(),
    )
    assert colm.online.source_sizes.tolist() == [12, 8, 4]
    craig = SelectionTrainer(
        model=make_tiny_llama(),
        args=make_args(tmp_path, selector="craig", domains=DOMAINS),
        train_dataset=make_dataset(),
    )
    assert craig._use_weights is True


def test_sampling_mode_weights_decide_what_is_trained(tmp_path):
    """A reweighter in sampling mode (static 0.8/0.1/0.1) draws the pools, so the trained rows follow it."""
    args = make_args(
        tmp_path,
        max_steps=6,
        selector="random",
        domains=DOMAINS,
        reweighter="static",
        reweighter_options={"weights": [0.8, 0.1, 0.1]},
    )
    trainer = SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=make_dataset((8, 8, 8)))
    spy = Spy(trainer)
    trainer.train()
    trained = torch.cat(spy.trained)[:, 0] - MARK
    share = float((trained == 0).float().mean())
    assert len(trained) == 24 and share >= 0.6  # uniform pools would give 1/3
    pools = torch.cat([pool["domain_ids"] for pool, _ in spy.pools])
    assert float((pools == 0).float().mean()) >= 0.6


def test_an_epoch_trains_as_many_rows_as_the_dataset(tmp_path):
    """num_train_epochs counts trained rows: 24 rows, 2 x 4 rows per optimiser step -> 3 steps per epoch."""
    args = make_args(
        tmp_path, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2, domains=DOMAINS, pool_factor=2
    )
    trainer = SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=make_dataset())
    spy = Spy(trainer)
    trainer.train()
    assert trainer.state.global_step == 6
    assert sum(t.shape[0] for t in spy.trained) == 48
    assert [p["input_ids"].shape[0] for p, _ in spy.pools] == [16] * 6


def test_small_batches_warn_about_budget_rounding_in_the_trainers_syntax(tmp_path, caplog):
    from mixsel.selection import budgets

    budgets._WARNED_SMALL_K.clear()
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=2, selector="stratified", domains=DOMAINS)
    trainer = SelectionTrainer(model=make_tiny_llama(), args=args, train_dataset=make_dataset())
    with caplog.at_level("WARNING", logger="mixsel"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "budgets: k=2" in r.getMessage()]
    assert lines and "selector_options={'rounding': 'carry'}" in lines[0]
    assert "selection.options" not in lines[0]


def test_selector_and_options_are_checked_when_the_arguments_are_made(tmp_path):
    with pytest.raises(ValueError, match="selector='bogus' is not registered; valid names: .*partitionsel"):
        make_args(tmp_path, selector="bogus")
    with pytest.raises(ValueError, match="selector_options for 'stratified'"):
        make_args(tmp_path, selector="stratified", selector_options={"nonsense": 1})
    with pytest.raises(ValueError, match="reweighter='bogus' is not registered"):
        make_args(tmp_path, reweighter="bogus")
    # every mixsel train setting is reachable, in mixsel train's syntax, checked by the same code
    args = make_args(tmp_path, selector="partitionsel", mixsel=["selection.features.blocks=1"])
    assert args.mixsel_config().selection.features.blocks == 1
    with pytest.raises(KeyError, match="blokcs"):
        make_args(tmp_path, mixsel=["selection.features.blokcs=1"])


def test_resume_continues_the_pools_and_the_selector_state(tmp_path):
    """mixsel_engine.pt in each checkpoint: sampler, selector (CoLM's Adam normaliser, the carry of
    rounding=carry) and reweighter come back, so a resumed run picks what an uninterrupted one picks."""
    import json

    def trainer(name, callbacks=()):
        args = make_args(
            tmp_path,
            output_dir=str(tmp_path / name),
            max_steps=4,
            selector="colm",
            selector_options={"rounding": "carry"},
            per_device_train_batch_size=2,
            domains=DOMAINS,
            save_strategy="steps",
            save_steps=2,
            log_selections=True,
        )
        return SelectionTrainer(
            model=make_tiny_llama(), args=args, train_dataset=make_dataset(), callbacks=list(callbacks)
        )

    full = trainer("full")
    full.train()
    part = trainer("part", [_StopAt(2)])
    part.train()
    assert (tmp_path / "part" / "checkpoint-2" / "mixsel_engine.pt").exists()
    trainer("part").train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    def picks(name):
        lines = (tmp_path / name / "selections.jsonl").read_text().splitlines()
        return {r["step"]: r["examples"] for r in map(json.loads, lines)}

    assert picks("part") == picks("full") and sorted(picks("full")) == [1, 2, 3, 4]
