"""Online minibatch selection and domain reweighting inside the Hugging Face ``Trainer``.

Pool, then slice, through public hooks only (the habit of trl's GRPO trainer; the Trainer's own
training loop is never copied):

1. :meth:`SelectionTrainer.get_train_dataloader` yields *pools* of
   ``pool_factor x per_device_train_batch_size`` examples, with the domain column kept;
2. :meth:`SelectionTrainer.training_step` pops the domain column, lets an
   :class:`mixsel.step.OnlineSelector` compute the features its selector needs (once per pool) and
   pick ``per_device_train_batch_size`` rows, slices the pool to those rows and hands them to the
   stock ``Trainer.training_step`` (autocast, gradient accumulation, ``accelerator.backward``);
3. :meth:`SelectionTrainer.compute_loss` returns the weighted mean of the per-example losses
   (mean cross-entropy over each example's target tokens): ``sum_i w_i l_i / sum_i w_i``, where
   ``w_i`` is the selection weight (with ``use_selection_weights``) times ``D * alpha_{d_i}`` when
   the reweighter acts on the loss (as ``mixsel.train``);
4. per-domain :class:`mixsel.DomainStats` of the selected rows go to a :class:`ReweightingCallback`,
   which owns the reweighter, updates it once per optimiser step, and is saved and restored with
   every Trainer checkpoint (``ExportableState``, stored in ``trainer_state.json``);
5. selection metrics (``time/select``, ``select/conflicts``, ``select/frac/<domain>``,
   ``weights/<domain>``...) are averaged between logging steps and added to the Trainer's own logs,
   so every ``report_to`` integration (TensorBoard, W&B...) receives them.

Example::

    args = SelectionTrainingArguments(output_dir="runs/hf", selector="stratified", pool_factor=4,
                           per_device_train_batch_size=8, max_steps=100, report_to=[])
    trainer = SelectionTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()

The TRL trainer (:mod:`mixsel.integrations.trl`) is this class on top of ``trl.SFTTrainer``: it
overrides the small hooks below (``_default_collator``, ``_pool_collator``,
``_prepare_selection_val``, ``_selected_inputs``, ``_weighted_loss``) and nothing of the step itself.
A :class:`ReweightingCallback` attached to any other Trainer raises instead of silently never updating.

Distributed runs (``torchrun`` / ``accelerate launch``) select *locally*: each rank selects from its
own pool shard and the loss is a per-rank mean (DDP then averages gradients); per-domain statistics
are all-reduced, so every rank's reweighter holds the same weights. Features are computed on the
unwrapped model (``accelerator.unwrap_model``); FSDP-sharded models need the hook-based features of
``mixsel train``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from mixsel import bookkeeping
from mixsel.config import FeatureConfig
from mixsel.integrations.hf_utils import (
    CausalLMCollator,
    DomainCollator,
    domain_id_of,
    from_jsonable,
    infer_domains,
    to_jsonable,
)
from mixsel.logging import check_world, launch_message
from mixsel.registry import get_reweighter, get_selector
from mixsel.reweighting.common import accumulate_stats
from mixsel.step import OnlineSelector
from mixsel.types import DomainStats

__all__ = ["ReweightingCallback", "SelectionTrainer", "SelectionTrainingArguments"]

log = logging.getLogger(__name__)

_VAL_FEATURES = frozenset({"val_scores", "val_gram"})


def _options(value: dict[str, Any] | str | None, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r}: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of keyword options, got {type(value).__name__}")
    return dict(value)


@dataclass
class SelectionTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the online selection and reweighting settings.

    The Trainer's batch size is the *selected* batch: each step draws a pool of
    ``pool_factor * per_device_train_batch_size`` examples per device and trains on
    ``per_device_train_batch_size`` of them.

    Attributes:
        selector: registered selector name (``mixsel.available_selectors()``), e.g. ``"stratified"``.
        selector_options: keyword options of the selector (a dict, or a JSON string on the CLI).
        reweighter: registered reweighter name (``uniform``, ``static``, ``doremi``) or ``None``.
        reweighter_options: keyword options of the reweighter.
        pool_factor: pool size as a multiple of the per-device batch (``1`` = no selection).
        feature_source: where gradient features come from (``selection.features.source`` of
            ``mixsel train``: ``"auto"`` = the selector's reference, ``"blocks"``, ``"lm_head"``).
        projection_dim: random-projection dimension of gradient features (``None`` = exact).
        feature_normalize: L2-normalise per-example gradient features (``None`` = the selector's
            reference).
        val_anchors: validation examples drawn per step as the selection target (for selectors that
            need ``val_scores`` / ``val_gram``; PartitionSel's code: 4).
        anchor_sampling: ``"uniform"`` over the validation examples or ``"balanced"`` over domains.
        use_selection_weights: weight the selected examples' losses by the selection weights
            (OMP coefficients, CRAIG cluster sizes); ``None`` = the method's reference.
        domain_column: dataset column with each example's domain (integer ids or names).
        domains: domain names in id order; maps name-valued domain columns to ids. Inferred from the
            training set when ``None``.
        selection_diagnostics: compute the gradient Gram of every pool for the conflict and
            gradient-mismatch metrics even when the selector does not need it (costs a feature pass).
        restore_callback_states_from_checkpoint: ``True`` by default here, so that the reweighter
            state returns on resume (the :class:`ReweightingCallback` restores itself either way).
    """

    selector: str = field(default="random", metadata={"help": "registered selector name"})
    selector_options: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "selector keyword options (dict or JSON string)"}
    )
    reweighter: str | None = field(default=None, metadata={"help": "registered reweighter name, or None"})
    reweighter_options: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "reweighter keyword options (dict or JSON string)"}
    )
    pool_factor: int = field(default=4, metadata={"help": "pool = pool_factor x per-device batch"})
    feature_source: str = field(default="auto", metadata={"help": "gradient feature source"})
    projection_dim: int | None = field(default=None, metadata={"help": "projection of gradient features"})
    feature_normalize: bool | None = field(default=None, metadata={"help": "normalise gradient features"})
    val_anchors: int = field(default=4, metadata={"help": "validation anchors per step"})
    anchor_sampling: str = field(default="uniform", metadata={"help": "anchors: uniform | balanced"})
    use_selection_weights: bool | None = field(default=None, metadata={"help": "weight losses by selection weights"})
    domain_column: str = field(default="domain", metadata={"help": "dataset column with the domain"})
    domains: list[str] | None = field(default=None, metadata={"help": "domain names in id order"})
    selection_diagnostics: bool = field(default=False, metadata={"help": "log gradient conflicts"})
    reweighting_projection_dim: int = field(
        default=512, metadata={"help": "dimension of the projected domain gradients (DoGraph)"}
    )
    reweighting_val_per_domain: int = field(
        default=4, metadata={"help": "validation rows per domain for the target gradient (DoGraph)"}
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "restore callback states (the reweighter) on resume"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.selector_options = _options(self.selector_options, "selector_options")
        self.reweighter_options = _options(self.reweighter_options, "reweighter_options")
        if isinstance(self.pool_factor, bool) or not isinstance(self.pool_factor, int) or self.pool_factor < 1:
            raise ValueError(f"pool_factor={self.pool_factor!r} must be an integer >= 1 (pool = pool_factor x batch)")
        if self.val_anchors < 0:
            raise ValueError(f"val_anchors={self.val_anchors} must be >= 0")
        if self.domains is not None:
            self.domains = [str(d) for d in self.domains]
            if len(set(self.domains)) != len(self.domains):
                raise ValueError(f"domains={self.domains} has duplicates; domain names must be unique")

    def feature_config(self) -> FeatureConfig:
        """The :class:`mixsel.config.FeatureConfig` these arguments describe."""
        return FeatureConfig(
            source=self.feature_source,
            projection_dim=self.projection_dim,
            normalize=self.feature_normalize,
            val_anchors=self.val_anchors,
            anchor_sampling=self.anchor_sampling,
        )


_NOT_FED = (
    "ReweightingCallback gets its per-domain statistics from mixsel's trainers; attached to another Trainer it "
    "would never update the weights: use mixsel.integrations.hf.SelectionTrainer or "
    "mixsel.integrations.trl.SelectionSFTTrainer with reweighter=<name> in their arguments"
)


class ReweightingCallback(TrainerCallback, ExportableState):
    """Owns a reweighter, updates it once per optimiser step, and checkpoints it with the Trainer.

    :class:`SelectionTrainer` calls :meth:`record` with each micro-step's (all-reduced) per-domain
    statistics; :meth:`on_step_end` applies one ``reweighter.update`` on their sum. The state
    (:meth:`state`) holds the constructor arguments and the reweighter's ``state_dict`` as JSON, as
    ``TrainerState.stateful_callbacks`` requires; it returns on ``train(resume_from_checkpoint=...)``
    either through the Trainer (``restore_callback_states_from_checkpoint``) or through
    :meth:`on_train_begin`, which reads the resumed ``TrainerState`` itself.

    Args:
        reweighter: registered reweighter name (``uniform``, ``static``, ``doremi``...).
        domains: domain names in id order.
        options: keyword options of the reweighter (JSON-serialisable).
    """

    def __init__(self, reweighter: str, domains: Sequence[str], options: dict[str, Any] | None = None) -> None:
        self.reweighter_name = reweighter
        self.domains = [str(d) for d in domains]
        self.options = from_jsonable(dict(options or {}))
        self.reweighter = get_reweighter(reweighter, domains=self.domains, **self.options)
        self._window: DomainStats | None = None

    @property
    def weights(self) -> torch.Tensor:
        """Tensor[D] the reweighter's current domain weights."""
        return self.reweighter.weights

    @property
    def reweighter_state(self) -> dict[str, Any]:
        """The reweighter's ``state_dict`` in JSON form (assigning it loads it)."""
        return to_jsonable(self.reweighter.state_dict())

    @reweighter_state.setter
    def reweighter_state(self, state: dict[str, Any]) -> None:
        self.reweighter.load_state_dict(from_jsonable(state))

    def record(self, stats: DomainStats) -> None:
        """Add one micro-step's per-domain statistics to the current optimiser step's window."""
        self._window = accumulate_stats(self._window, stats)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._window is None:
            raise RuntimeError(_NOT_FED)
        window, self._window = self._window, None
        window.step = int(state.global_step) - 1
        self.reweighter.update(window)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not isinstance(args, SelectionTrainingArguments):
            raise TypeError(_NOT_FED)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = next((s for s in saved if s.get("args", {}).get("domains") == self.domains), None)
        if not saved or "reweighter_state" not in saved.get("attributes", {}):
            return
        saved_args = saved.get("args", {})
        if saved_args.get("reweighter") != self.reweighter_name or saved_args.get("domains") != self.domains:
            raise ValueError(
                f"the checkpoint's reweighter is {saved_args.get('reweighter')!r} over domains "
                f"{saved_args.get('domains')}, but this run uses {self.reweighter_name!r} over {self.domains}; "
                "resume with the same reweighter and domains, or start a new run"
            )
        self.reweighter_state = saved["attributes"]["reweighter_state"]

    def log_dict(self) -> dict[str, float]:
        """``weights/<domain>`` (and the reweighter's diagnostics) for the Trainer logs."""
        return dict(self.reweighter.log_dict())

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "reweighter": self.reweighter_name,
                "domains": list(self.domains),
                "options": to_jsonable(self.options),
            },
            "attributes": {"reweighter_state": self.reweighter_state},
        }


@dataclass
class _Pending:
    """What ``training_step`` hands to ``compute_loss`` for the current selected batch."""

    weights: torch.Tensor
    losses: torch.Tensor | None = None
    capture: Any = None  # DoGraph: a bookkeeping.gradient_capture watching this step's backward


def _column_values(dataset: Any, column: str) -> list[Any]:
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            if column not in dataset.column_names:
                raise ValueError(
                    f"the training dataset has no {column!r} column (columns: {dataset.column_names}); "
                    "set SelectionTrainingArguments.domain_column"
                )
            return list(dataset[column])
    except ImportError:  # pragma: no cover - datasets is optional
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError("cannot infer the domains of an IterableDataset; set SelectionTrainingArguments.domains")
    values = []
    for i in range(len(dataset)):
        row = dataset[i]
        if column not in row:
            raise ValueError(
                f"training example {i} has no {column!r} column; set SelectionTrainingArguments.domain_column"
            )
        values.append(row[column])
    return values


class SelectionTrainer(Trainer):
    """A ``Trainer`` whose every step selects its minibatch from a larger candidate pool.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, callbacks: as for
            ``transformers.Trainer``; ``args`` must be a :class:`SelectionTrainingArguments`. Without a
            ``data_collator`` a :class:`~mixsel.integrations.hf_utils.CausalLMCollator` pads with the
            tokenizer's pad id (``labels`` padded with -100). Examples need ``input_ids``, ``labels``
            and the domain column.
        selection_val_dataset: validation anchors for selectors that need a validation target;
            defaults to ``eval_dataset``.
        reference_model: frozen reference LM for reweighters that need reference losses (DoReMi).
        **kwargs: passed to ``transformers.Trainer``.

    Raises:
        TypeError: ``args`` is not a :class:`SelectionTrainingArguments`.
        ValueError: missing domain column, validation anchors or reference model; options the
            weighted loss does not support (label smoothing, ``compute_loss_func``).
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False
    # DoGraph's domain gradients are captured in the training backward of compute_loss's own loss (a
    # subclass whose loss this class does not compute sets False: a separate pass over the trained rows).
    _capture_gradients = True

    def __init__(
        self,
        model: Any = None,
        args: SelectionTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        callbacks: list[TrainerCallback] | None = None,
        selection_val_dataset: Any = None,
        reference_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SelectionTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, SelectionTrainingArguments):
            raise TypeError(
                f"SelectionTrainer needs args=SelectionTrainingArguments(...), got {type(args).__name__}; "
                "SelectionTrainingArguments accepts every TrainingArguments field"
            )
        if args.label_smoothing_factor != 0:
            raise ValueError("SelectionTrainer computes its own weighted loss; set label_smoothing_factor=0")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("SelectionTrainer computes its own weighted loss; drop compute_loss_func")

        domains = args.domains
        if domains is None:
            if train_dataset is None:
                raise ValueError("set SelectionTrainingArguments.domains or pass a train_dataset to infer them from")
            domains = infer_domains(_column_values(train_dataset, args.domain_column), args.domain_column)
        self.domains: list[str] = list(domains)

        if data_collator is None:
            data_collator = self._default_collator(processing_class)

        callbacks = list(callbacks or [])
        existing = [cb for cb in callbacks if isinstance(cb, ReweightingCallback)]
        if args.reweighter is not None and not existing:
            callbacks.append(ReweightingCallback(args.reweighter, self.domains, args.reweighter_options))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        self.args: SelectionTrainingArguments
        # pools and validation anchors are collated with the domain column kept (padded rows)
        self.data_collator = DomainCollator(self._pool_collator(self.data_collator), args.domain_column, self.domains)

        selector = get_selector(args.selector, **args.selector_options)
        self._use_weights = bookkeeping.resolve_use_weights(selector, args.use_selection_weights)
        self.online = OnlineSelector(
            selector,
            args.feature_config(),
            len(self.domains),
            seed=args.seed,
            diagnostics=args.selection_diagnostics,
            source_sizes=self._source_sizes(train_dataset) if getattr(selector, "needs_source_sizes", False) else None,
        )
        reweighting = self.reweighting_callback
        rw = reweighting.reweighter if reweighting is not None else None
        if rw is not None and rw.needs_reference and reference_model is None:
            raise ValueError(
                f"reweighter {rw.name!r} needs reference losses: pass "
                "reference_model=<a frozen LM trained on the natural mixture>"
            )
        self.reference_model = reference_model
        wants_val = {
            who: why
            for who, why in (
                (f"selector {args.selector!r}", bool(self.online.needed() & _VAL_FEATURES)),
                (f"reweighter {getattr(rw, 'name', None)!r}", rw is not None and rw.needs_grad),
            )
            if why
        }
        if selection_val_dataset is None and wants_val:
            selection_val_dataset = self.eval_dataset  # for the TRL trainer: the prepared (tokenised) eval set
            if isinstance(selection_val_dataset, dict):
                raise ValueError("eval_dataset is a dict; pass selection_val_dataset=<one dataset> for the anchors")
            if selection_val_dataset is None:
                raise ValueError(
                    f"{' and '.join(wants_val)} need validation examples: pass eval_dataset or selection_val_dataset"
                )
        self.selection_val_dataset = self._prepare_selection_val(selection_val_dataset)
        self._val_prepared: Any = None
        self._val_domains: torch.Tensor | None = None
        self._pending: _Pending | None = None
        self._capture: Any = None
        self._sel_metrics: dict[str, list[float]] = defaultdict(list)
        self._micro = (-1, 0)  # (global step, micro-steps done in it)
        log.info(
            launch_message(
                type(self).__name__,
                world_size=self.accelerator.num_processes,
                backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
                mode="local",
                selector=args.selector,
                batch=self._train_batch_size,
                pool=self.pool_size,
                rank=self.accelerator.process_index,
                per_rank=True,
            )
        )
        check_world(self.accelerator.num_processes)

    # ---- hooks the TRL trainer overrides ----------------------------------------------------------

    def _default_collator(self, processing_class: Any) -> Any:
        """The collator used when none is given: right-padding :class:`CausalLMCollator`."""
        pad = getattr(processing_class, "pad_token_id", None)
        return CausalLMCollator(pad_token_id=0 if pad is None else pad)

    def _pool_collator(self, collator: Any) -> Any:
        """The collator of pools and validation anchors (padded rows, one per example)."""
        return collator

    def _prepare_selection_val(self, dataset: Any) -> Any:
        """The selection validation set in the training data's format (as given here)."""
        return dataset

    def _selected_inputs(self, inputs: dict[str, Any], idx: torch.Tensor, n: int) -> dict[str, Any]:
        """The model inputs of the selected rows ``idx`` of a pool of ``n`` rows (sliced here)."""
        selected = {}
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
                selected[key] = value[idx.to(value.device)]
            else:
                selected[key] = value
        return selected

    def _weighted_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], pending: _Pending, return_outputs: bool
    ) -> Any:
        """``sum_i w_i l_i / sum_i w_i`` over the selected rows; records the per-example losses."""
        from mixsel.features.loss import target_mask, token_losses

        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        tokens = token_losses(logits.float(), labels)  # per token, for DoReMi's per-token excess
        per_example = tokens.sum(1) / target_mask(labels).sum(1).clamp_min(1)
        if pending.capture is not None:
            pending.capture.watch(per_example)
        w = pending.weights.to(per_example.device)
        loss = (per_example * w).sum() / w.sum().clamp_min(1e-12)
        pending.losses = tokens.detach()
        return (loss, outputs) if return_outputs else loss

    # ---- data -----------------------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        """Examples per pool on this device: ``pool_factor * per-device batch``."""
        return self.args.pool_factor * self._train_batch_size

    @property
    def reweighting_callback(self) -> ReweightingCallback | None:
        """The live :class:`ReweightingCallback` (it is replaced when a checkpoint is restored)."""
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, ReweightingCallback):
                return cb
        return None

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the domain column through `remove_unused_columns` (transformers#25054).
        super()._set_signature_columns_if_needed()
        if self.args.domain_column not in self._signature_columns:
            self._signature_columns.append(self.args.domain_column)

    def get_train_dataloader(self) -> Any:
        """The training dataloader, whose batches are pools of :attr:`pool_size` examples."""
        if self.train_dataset is None:
            raise ValueError("SelectionTrainer: training requires a train_dataset.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self.pool_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _val_dataset(self) -> Any:
        """The selection validation set with the columns the model does not take removed (once)."""
        if self._val_prepared is None:
            ds = self.selection_val_dataset
            try:
                import datasets

                if isinstance(ds, datasets.Dataset):
                    ds = self._remove_unused_columns(ds, description="selection validation")
            except ImportError:  # pragma: no cover
                pass
            self._val_prepared = ds
        return self._val_prepared

    def _val_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        ds = self._val_dataset()
        batch = self.data_collator([ds[i] for i in rows])
        batch.pop(self.args.domain_column, None)
        return batch

    def _source_sizes(self, dataset: Any) -> torch.Tensor:
        """Training examples per domain of ``dataset`` (CoLM's dataset-level small sources)."""
        column = self.args.domain_column
        ids = [domain_id_of(v, self.domains, column) for v in _column_values(dataset, column)]
        return bookkeeping.source_sizes(ids, len(self.domains))

    def _validation_domains(self) -> torch.Tensor:
        """LongTensor[m] domain id of every selection validation example (read once)."""
        if self._val_domains is None:
            column = self.args.domain_column
            values = _column_values(self.selection_val_dataset, column)
            self._val_domains = torch.tensor([domain_id_of(v, self.domains, column) for v in values])
        return self._val_domains

    def _anchor_batch(self, step: int) -> dict[str, torch.Tensor] | None:
        if not (self.online.needed() & _VAL_FEATURES) or self.args.val_anchors == 0:
            return None
        balanced = self.args.anchor_sampling == "balanced"
        domains = self._validation_domains() if balanced else None
        rows = bookkeeping.draw_anchors(
            domains if balanced else len(self._val_dataset()),
            self.args.val_anchors,
            seed=self.args.seed,
            step=step,
            sampling=self.args.anchor_sampling,
        )
        batch = self._val_batch(rows.tolist())
        return batch if domains is None else {**batch, "domain_ids": domains[rows]}

    def _balanced_val_batch(self) -> dict[str, torch.Tensor]:
        """``reweighting_val_per_domain`` validation rows of every domain (DoGraph's target gradient)."""
        domains = self._validation_domains()
        rows = bookkeeping.balanced_rows(domains, len(self.domains), self.args.reweighting_val_per_domain)
        return self._val_batch(rows.tolist())

    # ---- the step -------------------------------------------------------------------------------

    def _step_id(self) -> int:
        """A per-micro-step counter derived from the global step (so it resumes exactly)."""
        step, done = self._micro
        if step != self.state.global_step:
            step, done = self.state.global_step, 0
        self._micro = (step, done + 1)
        return step * self.args.gradient_accumulation_steps + done

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Select from the pool in ``inputs``, then run the stock training step on the selection."""
        column = self.args.domain_column
        if column not in inputs:
            raise ValueError(
                f"the training pool has no {column!r} column (got {sorted(inputs)}); add it to the dataset "
                "or set SelectionTrainingArguments.domain_column"
            )
        inputs = dict(inputs)
        domain_ids = torch.as_tensor(inputs.pop(column)).long().cpu()
        n = int(domain_ids.numel())
        k = min(self._train_batch_size, n)
        step = self._step_id()
        reweighting = self.reweighting_callback
        domain_weights = reweighting.weights if reweighting is not None else None

        t0 = time.perf_counter()
        pool = {key: inputs[key] for key in bookkeeping.MODEL_KEYS if key in inputs}
        pool["domain_ids"] = domain_ids
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        result = self.online(
            self.accelerator.unwrap_model(model),
            pool,
            k,
            step=step,
            lr=lr,
            val_batch=self._anchor_batch(step),
            domain_weights=domain_weights,
        )
        selection = result.selection
        t_select = time.perf_counter() - t0

        idx = selection.indices
        chosen = domain_ids[idx]
        loss_weights = bookkeeping.mixture_weights(reweighting.reweighter)[1] if reweighting is not None else None
        w = bookkeeping.example_weights(selection, chosen, use_weights=self._use_weights, loss_weights=loss_weights)
        selected = self._selected_inputs(inputs, idx, n)
        rw = reweighting.reweighter if reweighting is not None else None
        capture = None
        if rw is not None and rw.needs_grad and self._capture_gradients:
            # DoGraph's domain gradients of the trained rows, from this very backward
            capture = bookkeeping.gradient_capture(self.accelerator.unwrap_model(model), **self._grad_kwargs())
        self._pending = _Pending(weights=w, capture=capture)
        try:
            with capture if capture is not None else contextlib.nullcontext():
                loss = super().training_step(model, selected, num_items_in_batch=None)
            per_example = self._pending.losses
        finally:
            self._pending = None
        if per_example is None:
            raise RuntimeError("compute_loss did not record per-example losses; do not override it without super()")
        self._capture = capture
        self._after_step(pool, idx, chosen, per_example.detach(), result.metrics, t_select, n)
        return loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Weighted mean of per-example losses on a selected batch; the stock loss otherwise (eval)."""
        inputs = dict(inputs)
        inputs.pop(self.args.domain_column, None)
        pending = self._pending
        if pending is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self._weighted_loss(model, inputs, pending, return_outputs)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs = dict(inputs)
        inputs.pop(self.args.domain_column, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # ---- statistics and metrics -----------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes <= 1:
            return t
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()

    def _domain_stats(
        self, pool: dict[str, torch.Tensor], idx: torch.Tensor, chosen: torch.Tensor, per_example: torch.Tensor
    ) -> DomainStats:
        """This micro-step's per-domain statistics, summed over ranks (what the reweighter needs, no more)."""
        from mixsel.features.loss import target_mask

        num = len(self.domains)
        rw = self.reweighting_callback.reweighter if self.reweighting_callback is not None else None
        trained = {k: pool[k][idx.to(pool[k].device)] for k in bookkeeping.MODEL_KEYS}
        ref = None
        if rw is not None and rw.needs_reference and self.reference_model is not None:
            ref_model = self.reference_model
            if next(ref_model.parameters()).device != self.args.device:
                ref_model.to(self.args.device)
            ref_model.eval().requires_grad_(False)
            ref = bookkeeping.reference_losses(ref_model, trained)
        mask = target_mask(trained["labels"]).cpu()
        if per_example.dim() == 1:  # per-example losses (the TRL route): compare per-example means
            ref = None if ref is None else ref.sum(1) / mask.sum(1).clamp_min(1)
            mask = None
        stats = bookkeeping.domain_stats(
            chosen, per_example, num, step=self.state.global_step, ref_losses=ref, mask=mask
        )
        if rw is not None and rw.needs_grad:  # DoGraph: domain gradients of the trained rows (captured)
            last_micro = self._micro[1] == self.args.gradient_accumulation_steps
            update = last_micro and bookkeeping.is_update_step(self.state.global_step, rw.update_every)
            model = self.accelerator.unwrap_model(self.model)
            if self._capture is not None:
                stats.grad = bookkeeping.captured_domain_gradients(
                    self._capture, trained, chosen, num, model=model, **self._grad_kwargs()
                )
            else:  # a loss this trainer does not compute (TRL's): a separate pass over the trained rows
                stats.grad, _ = bookkeeping.domain_gradients(
                    model, trained, chosen, num, val_batch=None, **self._grad_kwargs()
                )
            if update:
                stats.val_grad = bookkeeping.validation_gradient(
                    model, self._balanced_val_batch(), **self._grad_kwargs()
                )
        return bookkeeping.reduce_stats(stats, self._all_reduce)

    def _grad_kwargs(self) -> dict[str, Any]:
        fc = self.args.feature_config()
        return {
            "source": fc.source,
            "modules": fc.modules,
            "projection_dim": self.args.reweighting_projection_dim,
            "seed": self.args.seed,
        }

    def _after_step(
        self,
        pool: dict[str, torch.Tensor],
        idx: torch.Tensor,
        chosen: torch.Tensor,
        per_example: torch.Tensor,
        step_metrics: dict[str, float],
        t_select: float,
        pool_n: int,
    ) -> None:
        stats = self._domain_stats(pool, idx, chosen, per_example)
        reweighting = self.reweighting_callback
        if reweighting is not None:
            reweighting.record(stats)
        m = self._sel_metrics
        for key, value in step_metrics.items():
            m[key].append(float(value))
        m["time/select"].append(t_select)
        m["select/pool_size"].append(float(pool_n))
        frac = stats.counts / stats.counts.sum().clamp_min(1)
        for d, name in enumerate(self.domains):
            m[f"select/frac/{name}"].append(float(frac[d]))
            if stats.counts[d] > 0:
                m[f"select/loss/{name}"].append(float(stats.mean_loss()[d]))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the selection metrics (averaged since the last log) and domain weights to training logs."""
        if "loss" in logs and self._sel_metrics:
            for key, values in self._sel_metrics.items():
                logs[key] = sum(values) / len(values)
            self._sel_metrics.clear()
            reweighting = self.reweighting_callback
            if reweighting is not None:
                logs.update(reweighting.log_dict())
        super().log(logs, start_time)
