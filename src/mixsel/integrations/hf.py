"""Online minibatch selection and domain reweighting inside the Hugging Face ``Trainer``.

The step is :class:`mixsel.engine.Engine`'s, the one ``mixsel train`` runs (``tests/parity`` checks the
same picks, losses and weights); the Trainer keeps its loop, optimiser, accumulation, mixed precision,
checkpoints and logging, reached through its hooks only (the Trainer's loop is never copied):

1. :meth:`SelectionTrainer.get_batch_samples` (the hook that gathers one optimiser step's
   micro-batches) plans the step: the engine draws one pool of ``pool_factor x k`` rows by the
   reweighter's sampling weights (``k = per_device_train_batch_size x gradient_accumulation_steps x
   world size``), computes the features the selector declares, selects ``k`` rows (``global``: the
   same on every rank; ``local``: each rank from its shard) and cuts this rank's share into the
   step's micro-batches;
2. :meth:`SelectionTrainer.compute_loss` returns each micro-batch's part of one weighted mean over
   the whole selection (:meth:`mixsel.engine.Engine.loss`; ``loss_is_scaled_for_ga``);
3. after the optimiser step (a callback's ``on_step_end``) the engine computes the per-domain
   statistics the reweighter declares and updates it; selection metrics are averaged between
   logging steps into the Trainer's logs (every ``report_to`` integration receives them);
4. each checkpoint holds the engine's state (``mixsel_engine.pt``: sampler, selector, reweighter);
   the :class:`ReweightingCallback` keeps the reweighter's state in ``trainer_state.json`` too.

Example::

    args = SelectionTrainingArguments(output_dir="runs/hf", selector="stratified", pool_factor=4,
                           per_device_train_batch_size=8, max_steps=100, report_to=[])
    trainer = SelectionTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()

The arguments are one configuration with ``mixsel train``'s: :meth:`SelectionTrainingArguments.mixsel_config`
builds its :class:`mixsel.config.ExperimentConfig` (named fields plus ``mixsel=[a.b=c, ...]`` overrides).

The TRL trainer (:mod:`mixsel.integrations.trl`) is this class on top of ``trl.SFTTrainer``: it
overrides the small hooks below (``_default_collator``, ``_pool_collator``,
``_prepare_selection_val``, ``_micro_inputs``, ``_weighted_loss``) and nothing of the step itself.
A :class:`ReweightingCallback` attached to any other Trainer raises instead of silently never updating.
Features are computed on the unwrapped model (``accelerator.unwrap_model``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from mixsel.config import ExperimentConfig, FeatureConfig
from mixsel.engine import build_engine, reweighter_update_every
from mixsel.errors import ConfigError, DataError, OptionError
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
            raise ConfigError(f"{name} must be a dict or a JSON object string, got {value!r}: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict of keyword options, got {type(value).__name__}")
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
    distributed_selection: str = field(
        default="global", metadata={"help": "who computes selection features over ranks: global | gather | local"}
    )
    log_selections: bool = field(
        default=False, metadata={"help": "write every step's picks (rows, domains, weights) to selections.jsonl"}
    )
    mixsel: list[str] | dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "further mixsel settings as `mixsel train` overrides, e.g. ['selection.features.blocks=2']"},
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "restore callback states (the reweighter) on resume"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.selector_options = _options(self.selector_options, "selector_options")
        self.reweighter_options = _options(self.reweighter_options, "reweighter_options")
        if isinstance(self.pool_factor, bool) or not isinstance(self.pool_factor, int) or self.pool_factor < 1:
            raise ConfigError(f"pool_factor={self.pool_factor!r} must be an integer >= 1 (pool = pool_factor x batch)")
        if self.val_anchors < 0:
            raise ConfigError(f"val_anchors={self.val_anchors} must be >= 0")
        if self.domains is not None:
            self.domains = [str(d) for d in self.domains]
            if len(set(self.domains)) != len(self.domains):
                raise ConfigError(f"domains={self.domains} has duplicates; domain names must be unique")
        self.check_methods()

    def check_methods(self) -> Any:
        """Build the configured selector and check the reweighter's name now, at argument time.

        Returns:
            The selector (``selection.method`` with its options).

        Raises:
            ValueError: one line naming the bad argument and the valid choices.
        """
        from mixsel.registry import available_reweighters, available_selectors

        cfg = self.mixsel_config(self.world_size)
        method, options = cfg.selection.method, cfg.selection.options
        if method not in available_selectors():
            raise ConfigError(f"selector={method!r} is not registered; valid names: {', '.join(available_selectors())}")
        try:
            selector = get_selector(method, **options)
        except OptionError as err:  # an unknown or missing keyword option
            raise ConfigError(f"selector_options for {method!r}: {err}; docs/methods.md lists the options") from None
        if cfg.reweighting.method not in available_reweighters():
            raise ConfigError(
                f"reweighter={cfg.reweighting.method!r} is not registered; valid names: "
                f"{', '.join(available_reweighters())} (or None)"
            )
        return selector

    def mixsel_config(self, world_size: int = 1) -> ExperimentConfig:
        """The :class:`mixsel.config.ExperimentConfig` these arguments describe (what the engine runs).

        The step's batch is ``per_device_train_batch_size x gradient_accumulation_steps x world_size``
        (``train.batch_size``), its micro-batch ``per_device_train_batch_size`` and its pool
        ``pool_factor`` times the batch; ``mixsel`` overrides (``a.b=c``, the syntax of ``mixsel train``)
        reach every other field and are validated by the same code, with the same messages.
        """
        from mixsel.config import apply_overrides, config_to_dict, from_dict, validate

        if self.distributed_selection not in ("global", "gather", "local"):
            raise ConfigError(
                f"distributed_selection={self.distributed_selection!r} is not one of 'global', 'gather', 'local' "
                "(docs/distributed.md)"
            )
        rw_options = dict(self.reweighter_options or {})
        update_every = int(rw_options.pop("update_every", 1))
        k = self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size
        tree = config_to_dict(ExperimentConfig())
        tree["seed"] = self.seed
        tree["train"].update(
            batch_size=k,
            micro_batch_size=self.per_device_train_batch_size,
            pool_size=self.pool_factor * k,
            distributed_selection=self.distributed_selection,
        )
        tree["selection"].update(
            method=self.selector,
            options=dict(self.selector_options or {}),
            use_weights=self.use_selection_weights,
            diagnostics=self.selection_diagnostics,
        )
        tree["selection"]["features"].update(
            source=self.feature_source,
            projection_dim=self.projection_dim,
            normalize=self.feature_normalize,
            val_anchors=self.val_anchors,
            anchor_sampling=self.anchor_sampling,
        )
        tree["reweighting"].update(
            method=self.reweighter or "uniform",
            options=rw_options,
            update_every=update_every,
            projection_dim=self.reweighting_projection_dim,
            val_per_domain=self.reweighting_val_per_domain,
        )
        extra = self.mixsel
        if isinstance(extra, str):
            extra = [extra]
        if isinstance(extra, dict):
            extra = [f"{key}={json.dumps(value)}" for key, value in extra.items()]
        tree = apply_overrides(tree, list(extra or []))
        cfg = from_dict(ExperimentConfig, tree)
        cfg.reweighting.options.pop("update_every", None)  # an override's; the engine reads reweighting.update_every
        return validate(cfg)

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
        self._fed = False

    def mark_fed(self) -> None:
        """The trainer's engine updated the reweighter this step (so :meth:`on_step_end` has nothing to do)."""
        self._fed = True

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
        fed, self._fed = self._fed, False
        if self._window is None:
            if fed:
                return
            raise RuntimeError(_NOT_FED)
        window, self._window = self._window, None
        window.step = int(state.global_step) - 1
        self.reweighter.update(window)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not isinstance(args, SelectionTrainingArguments):
            raise OptionError(_NOT_FED)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = next((s for s in saved if s.get("args", {}).get("domains") == self.domains), None)
        if not saved or "reweighter_state" not in saved.get("attributes", {}):
            return
        saved_args = saved.get("args", {})
        if saved_args.get("reweighter") != self.reweighter_name or saved_args.get("domains") != self.domains:
            raise ConfigError(
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


def _column_values(dataset: Any, column: str) -> list[Any]:
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            if column not in dataset.column_names:
                raise ConfigError(
                    f"the training dataset has no {column!r} column (columns: {dataset.column_names}); "
                    "set SelectionTrainingArguments.domain_column"
                )
            return list(dataset[column])
    except ImportError:  # pragma: no cover - datasets is optional
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DataError("cannot infer the domains of an IterableDataset; set SelectionTrainingArguments.domains")
    values = []
    for i in range(len(dataset)):
        row = dataset[i]
        if column not in row:
            raise ConfigError(
                f"training example {i} has no {column!r} column; set SelectionTrainingArguments.domain_column"
            )
        values.append(row[column])
    return values


def _say(line: str) -> None:
    """A start line: to the ``mixsel`` loggers when the user configured logging, else on stderr (seen without
    any set-up, as ``mixsel train`` prints it)."""
    if logging.getLogger(__name__).hasHandlers():
        log.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


class _Ticks(torch.utils.data.Dataset):
    """The Trainer's training "dataset": one item per micro-step of an epoch (the engine draws the rows).

    The Trainer counts epochs, skips on resume and shards over ranks by this dataloader; the rows of
    each step come from the engine's domain-weighted :class:`mixsel.data.CandidateSampler`.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _tick_collate(items: list[int]) -> dict[str, torch.Tensor]:
    return {"tick": torch.tensor(items)}


class _EngineCallback(TrainerCallback):
    """Finishes each optimiser step after the Trainer's optimiser step: statistics -> the reweighter."""

    def __init__(self, trainer: SelectionTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer._plan is not None:
            trainer.engine.before_update(trainer.accelerator.unwrap_model(trainer.model), trainer._plan)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._finish_step()


#: The key under which a micro-batch's :class:`mixsel.engine.MicroBatch` rides in the Trainer's inputs.
MICRO_KEY = "mixsel_micro"


class SelectionTrainer(Trainer):
    """A ``Trainer`` whose every optimiser step selects its minibatch from a larger candidate pool.

    The step is :class:`mixsel.engine.Engine`'s, the one ``mixsel train`` runs: one pool of
    ``pool_factor x`` the step's whole batch (``per_device_train_batch_size x
    gradient_accumulation_steps x world size`` examples) is drawn per optimiser step by the domain
    weights (a reweighter in ``sampling`` mode changes what is trained), one selection is made, and
    each rank's share is sliced into the micro-batches the Trainer accumulates. The loss is the
    weighted mean over the whole selection (one normaliser over ranks and micro-batches).

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

    # compute_loss returns the micro-batch's part of the step's weighted mean (global normaliser)
    loss_is_scaled_for_ga = True
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
            raise OptionError(
                f"SelectionTrainer needs args=SelectionTrainingArguments(...), got {type(args).__name__}; "
                "SelectionTrainingArguments accepts every TrainingArguments field"
            )
        if args.label_smoothing_factor != 0:
            raise ConfigError("SelectionTrainer computes its own weighted loss; set label_smoothing_factor=0")
        if kwargs.get("compute_loss_func") is not None:
            raise ConfigError("SelectionTrainer computes its own weighted loss; drop compute_loss_func")
        if isinstance(train_dataset, torch.utils.data.IterableDataset):
            raise ConfigError(
                "SelectionTrainer draws each step's pool by domain from an indexable train_dataset; an "
                "IterableDataset has no random access: pass a datasets.Dataset (e.g. IterableDataset -> "
                "Dataset.from_generator)"
            )

        domains = args.domains
        if domains is None:
            if train_dataset is None:
                raise ConfigError("set SelectionTrainingArguments.domains or pass a train_dataset to infer them from")
            domains = infer_domains(_column_values(train_dataset, args.domain_column), args.domain_column)
        self.domains: list[str] = list(domains)

        if data_collator is None:
            data_collator = self._default_collator(processing_class)

        cfg = args.mixsel_config(args.world_size)
        callbacks = list(callbacks or [])
        existing = [cb for cb in callbacks if isinstance(cb, ReweightingCallback)]
        if (args.reweighter is not None or cfg.reweighting.method != "uniform") and not existing:
            rc = cfg.reweighting
            options = {**rc.options, "update_every": reweighter_update_every(rc)}
            try:
                callbacks.append(ReweightingCallback(rc.method, self.domains, options))
            except OptionError as err:  # an unknown or missing keyword option
                raise ConfigError(
                    f"reweighter_options for {rc.method!r}: {err}; docs/reweighting.md lists the options"
                ) from None
        callbacks.insert(0, _EngineCallback(self))
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
        self.mixsel_config = cfg
        reweighting = self.reweighting_callback
        rw = reweighting.reweighter if reweighting is not None else None
        if rw is not None and rw.needs_reference and reference_model is None:
            raise ConfigError(
                f"reweighter {rw.name!r} needs reference losses: pass "
                "reference_model=<a frozen LM trained on the natural mixture>"
            )
        self.reference_model = reference_model
        selector = args.check_methods()
        self.selection_val_dataset = self._selection_val(selection_val_dataset, selector, rw)
        self._val_prepared: Any = None
        self._train_prepared: Any = None
        self._plan: Any = None
        self._sel_metrics: dict[str, list[float]] = defaultdict(list)
        self.engine = self._build_engine(selector, rw)
        cfg = self.mixsel_config
        _say(
            launch_message(
                type(self).__name__,
                world_size=self.accelerator.num_processes,
                backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
                mode=cfg.train.distributed_selection,
                selector=cfg.selection.method,
                batch=cfg.train.batch_size,
                pool=cfg.train.pool_size,
                rank=self.accelerator.process_index,
            )
        )
        check_world(self.accelerator.num_processes)

    def _selection_val(self, dataset: Any, selector: Any, rw: Any) -> Any:
        """The validation set of the anchors and of DoGraph's target (eval_dataset unless given)."""
        from mixsel.step import resolve_features

        fc = resolve_features(self.mixsel_config.selection.features, selector)
        needs_anchors = bool(set(selector.requires) & _VAL_FEATURES)
        wants_val = {
            who: why
            for who, why in (
                (f"selector {selector.name!r}", needs_anchors and fc.val_anchors > 0),
                (f"reweighter {getattr(rw, 'name', None)!r}", rw is not None and rw.needs_grad),
            )
            if why
        }
        if dataset is None and wants_val:
            dataset = self.eval_dataset  # for the TRL trainer: the prepared (tokenised) eval set
            if isinstance(dataset, dict):
                raise DataError("eval_dataset is a dict; pass selection_val_dataset=<one dataset> for the anchors")
            if dataset is None:
                raise ConfigError(
                    f"{' and '.join(wants_val)} need validation examples: pass eval_dataset or selection_val_dataset"
                )
        return self._prepare_selection_val(dataset)

    def _build_engine(self, selector: Any, rw: Any) -> Any:
        """The step engine over this trainer's datasets (:func:`mixsel.engine.build_engine`)."""
        from mixsel.distributed import World

        column = self.args.domain_column
        train_domains = torch.tensor(
            [domain_id_of(v, self.domains, column) for v in _column_values(self.train_dataset, column)]
            if self.train_dataset is not None
            else [0],
            dtype=torch.long,
        )
        acc = self.accelerator
        world = World(acc.process_index, acc.num_processes, acc.local_process_index)
        engine = build_engine(
            self.mixsel_config,
            selector,
            self.domains,
            train_domains=train_domains,
            train_batch=self._train_rows,
            val_domains=self._validation_domains(),
            val_batch=self._val_rows,
            world=world,
            reference=self.reference_model,
            reweighter=rw if rw is not None else get_reweighter("uniform", domains=self.domains),
        )
        engine.reweighting.capture_in_backward = self._capture_gradients
        return engine

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

    def _micro_inputs(self, micro: Any) -> dict[str, Any]:
        """The Trainer inputs of one micro-batch: the model inputs and the micro-batch itself."""
        return {**micro.batch.model_inputs(), MICRO_KEY: micro}

    def _weighted_loss(self, model: torch.nn.Module, inputs: dict[str, Any], micro: Any, return_outputs: bool) -> Any:
        """The micro-batch's part of the step's weighted mean (:meth:`mixsel.engine.Engine.loss`)."""
        inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = self.engine.loss(self._plan, micro, logits)
        return (loss, outputs) if return_outputs else loss

    # ---- data -----------------------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        """Candidates per pool (every rank holds the same pool): ``pool_factor`` x the step's batch."""
        return self.mixsel_config.train.pool_size

    @property
    def _use_weights(self) -> bool:
        """Whether the loss applies the selection weights (the engine's resolved switch)."""
        return self.engine.use_weights

    @property
    def online(self) -> Any:
        """The :class:`mixsel.step.OnlineSelector` of the engine."""
        return self.engine.selector

    @online.setter
    def online(self, value: Any) -> None:
        self.engine.selector = value

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
        """One tick per micro-step: an epoch is ``ceil(N / step batch)`` optimiser steps, so it trains
        about as many rows as the training set holds (the engine draws them)."""
        if self.train_dataset is None:
            raise DataError("SelectionTrainer: training requires a train_dataset.")
        k = self.mixsel_config.train.batch_size
        ga = self.args.gradient_accumulation_steps
        steps = max(math.ceil(len(self.train_dataset) / k), 1)
        ticks = _Ticks(steps * ga * self.accelerator.num_processes)
        return self.accelerator.prepare(torch.utils.data.DataLoader(ticks, batch_size=1, collate_fn=_tick_collate))

    def _prepared(self, which: str) -> Any:
        """The training or selection validation set with the columns the model does not take removed (once)."""
        attr = "_train_prepared" if which == "train" else "_val_prepared"
        if getattr(self, attr) is None:
            ds = self.train_dataset if which == "train" else self.selection_val_dataset
            try:
                import datasets

                if isinstance(ds, datasets.Dataset):
                    ds = self._remove_unused_columns(ds, description=f"selection {which}")
            except ImportError:  # pragma: no cover
                pass
            setattr(self, attr, ds)
        return getattr(self, attr)

    def _rows(self, which: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        ds = self._prepared(which)
        batch = self.data_collator([ds[int(i)] for i in rows.tolist()])
        domains = batch.pop(self.args.domain_column, None)
        if domains is not None:
            batch["domain_ids"] = domains
        return batch

    def _train_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._rows("train", rows)

    def _val_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._rows("val", rows)

    def _validation_domains(self) -> torch.Tensor:
        """LongTensor[m] domain id of every selection validation example."""
        if self.selection_val_dataset is None:
            return torch.zeros(0, dtype=torch.long)
        column = self.args.domain_column
        values = _column_values(self.selection_val_dataset, column)
        return torch.tensor([domain_id_of(v, self.domains, column) for v in values], dtype=torch.long)

    def _anchor_batch(self, step: int) -> dict[str, torch.Tensor] | None:
        """The validation anchors of ``step`` (as the engine draws them)."""
        return self.engine.anchors(step)

    # ---- the step -------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """One selection per optimiser step: the engine plans the step, its micro-batches are returned."""
        ticks = 0
        for _ in range(num_batches):
            try:
                next(epoch_iterator)
            except StopIteration:
                break
            ticks += 1
        if ticks == 0:
            return [], None
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        from mixsel.selection.budgets import ROUNDING_HINT

        model = self.accelerator.unwrap_model(self.model)
        hint = ROUNDING_HINT.set("selector_options={'rounding': 'carry'}")  # warnings in this route's syntax
        try:
            self._plan = plan = self.engine.plan(model, step=self.state.global_step, lr=lr, micro_batches=ticks)
        finally:
            ROUNDING_HINT.reset(hint)
        return [self._micro_inputs(m) for m in plan.micro_batches], None

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The stock training step on one micro-batch of the selection (DoGraph's capture around it)."""
        plan = self._plan
        with plan.backward_context() if plan is not None else contextlib.nullcontext():
            return super().training_step(model, inputs, num_items_in_batch=None)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Weighted mean of per-example losses on a selected micro-batch; the stock loss otherwise (eval)."""
        inputs = dict(inputs)
        inputs.pop(self.args.domain_column, None)
        micro = inputs.pop(MICRO_KEY, None)
        if micro is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self._weighted_loss(model, inputs, micro, return_outputs)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs = dict(inputs)
        inputs.pop(self.args.domain_column, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _finish_step(self) -> None:
        """After the optimiser step: the engine's statistics update the reweighter; metrics are kept."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        report = self.engine.finish(self.accelerator.unwrap_model(self.model), plan)
        reweighting = self.reweighting_callback
        if reweighting is not None:
            reweighting.mark_fed()
        if self.args.log_selections and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "selections.jsonl"), "a") as fh:
                fh.write(json.dumps(self.engine.selections_record(plan)) + "\n")
        m = self._sel_metrics
        for key, value in report.metrics.items():
            m[key].append(float(value))
        m["select/pool_size"].append(float(len(plan.pool)))

    # ---- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = self.engine.state_dict()
        if self.engine.selector.mode == "local":  # every rank's selector has its own state
            from mixsel.distributed import all_gather_object

            state["selector_ranks"] = all_gather_object(state["selector"])
        if self.is_world_process_zero():
            torch.save(state, os.path.join(folder, ENGINE_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        reweighting = self.reweighting_callback  # a restored checkpoint replaces the callback
        if reweighting is not None:
            self.engine.reweighting.reweighter = reweighting.reweighter

        path = os.path.join(checkpoint, ENGINE_STATE) if checkpoint else None
        if path is None or not os.path.exists(path):
            return
        state = torch.load(path, weights_only=True)  # tensors, numbers and strings only: never code
        ranks = state.get("selector_ranks")
        self.engine.load_state_dict(state, None if ranks is None else ranks[self.accelerator.process_index])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the selection metrics (averaged since the last log) and domain weights to training logs."""
        if "loss" in logs and self._sel_metrics:
            for key, values in self._sel_metrics.items():
                logs[key] = sum(values) / len(values)
            self._sel_metrics.clear()
        super().log(logs, start_time)


#: The engine's state (sampler, selector, reweighter) in each Trainer checkpoint folder.
ENGINE_STATE = "mixsel_engine.pt"
