"""Online selection and domain reweighting inside TRL's ``SFTTrainer`` (``pip install "mixsel[trl]"``).

:class:`SelectionSFTTrainer` is :class:`mixsel.integrations.hf.SelectionTrainer` on top of
``trl.SFTTrainer``: the same pool -> select -> slice -> weighted step -> reweight loop (one piece of
code, in ``hf.py``), with TRL's own data preparation, loss and metrics kept:

* **data**: TRL prepares the datasets as usual (language modelling ``text``, conversational
  ``messages``, ``prompt``/``completion`` pairs, the tokenizer's chat template, completion-only and
  assistant-only loss, truncation to ``max_length``); the domain column survives TRL's column
  pruning (it is added to the signature columns);
* **anchors**: selectors that target a validation gradient (``partitionsel``, ``greats``...) draw
  their anchors from the *prepared* eval set (or a ``selection_val_dataset``, prepared the same way);
* **loss**: TRL's fused-LM-head per-token loss, with every token of selected example ``i``
  weighted (:func:`token_weights`; ``w_i`` as in ``SelectionTrainer``: selection weight x domain
  multiplier ``D alpha_d``; ``n_j`` the example's target tokens), normalised over the whole step
  (every micro-batch and rank): the loss is ``sum_i w_i sum_t l_it / sum_i w_i n_i`` and equals TRL's
  token mean when every ``w_i = 1``; ``loss_normalization="example"`` gives ``mixsel train``'s
  ``sum_i w_i l_i / sum_i w_i`` of per-example means instead;
* **metrics**: TRL's ``mean_token_accuracy``, ``entropy`` and ``num_tokens`` (now counting the
  selected rows), next to mixsel's ``time/select``, ``select/frac/<domain>``, ``weights/<domain>``;
* **padding-free** (``padding_free=True``): pools are collated padded (features need one row per
  example); the selected rows are then flattened by TRL's padding-free collator;
* **degenerate rows**: as ``mixsel train``'s loading, conversations without an assistant reply (or
  with an empty one), empty completions and empty texts are dropped before TRL prepares the data,
  with one warning counting them per domain (:func:`drop_degenerate_rows`; not with a
  ``formatting_func`` or ``skip_prepare_dataset``); an empty train or eval set is one clear line;
* **remote code**: TRL loads a model or tokenizer named by a string with ``trust_remote_code=False``
  unless ``SelectionSFTConfig(trust_remote_code=True)``;
* **packing** packs several examples (of any domains) into one row and drops the domain column, so
  a per-example selection is not defined on it: ``packing=True`` is rejected with a one-line error
  (``padding_free=True`` gives the same padding savings).

Example::

    from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer

    args = SelectionSFTConfig(output_dir="runs/sft", selector="partitionsel", pool_factor=4,
                              reweighter="doremi", per_device_train_batch_size=8, max_steps=200)
    trainer = SelectionSFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=args,
                                  train_dataset=train, eval_dataset=val)   # "messages" + "domain"
    trainer.train()

Tested with trl 1.16 (its fused LM head, ``model(..., fused_lm_head=True)``, returns the per-token
log-probabilities that the weights act on).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f'mixsel.integrations.trl needs TRL ({err}); pip install "mixsel[trl]"') from None

from mixsel.errors import ConfigError, DataError, OptionError
from mixsel.integrations.hf import MICRO_KEY, SelectionTrainer, SelectionTrainingArguments

__all__ = ["SelectionSFTConfig", "SelectionSFTTrainer", "drop_degenerate_rows", "token_weights"]

log = logging.getLogger(__name__)


@dataclass
class SelectionSFTConfig(SFTConfig, SelectionTrainingArguments):
    """``trl.SFTConfig`` plus the selection fields of :class:`SelectionTrainingArguments`.

    TRL's defaults are kept (``learning_rate=2e-5``, ``logging_steps=10``, ``gradient_checkpointing=True``,
    ``bf16``); ``per_device_train_batch_size`` is the *selected* micro-batch, and each optimiser step
    selects ``k = per_device_train_batch_size x gradient_accumulation_steps x world size`` rows from
    one pool of ``pool_factor x k``. ``loss_normalization`` picks TRL's token-weighted mean (default)
    or ``mixsel train``'s per-example mean. ``packing`` is not supported (see module doc).
    """

    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "token: TRL's token mean, each example's tokens weighted by its weight; example: mixsel "
            "train's weighted mean of per-example mean losses"
        },
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "restore callback states (the reweighter) on resume"}
    )

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not _has_bf16_accelerator()):
            # TRL turns bf16 on by default, which a machine without a bf16 GPU refuses ("Your setup doesn't
            # support bf16/gpu") and use_cpu=True runs as bf16 autocast on the CPU, several times slower
            self.bf16 = False
            log.warning("SelectionSFTConfig: bf16 off (no GPU with bfloat16 here); pass bf16=True to force it")
        super().__post_init__()
        if self.loss_normalization not in ("token", "example"):
            raise ConfigError(f"loss_normalization={self.loss_normalization!r} must be 'token' or 'example'")


def _has_bf16_accelerator() -> bool:
    """A CUDA GPU with bfloat16, or another accelerator (MPS, XPU) that TRL's bf16 default may use."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    xpu = getattr(torch, "xpu", None)
    return bool(torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()))


def token_weights(
    weights: torch.Tensor,
    rows: torch.Tensor,
    label_mask: torch.Tensor,
    total: torch.Tensor | None = None,
    world_size: int = 1,
    normalization: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss multipliers that weight examples inside a token-mean loss.

    Args:
        weights: Tensor[k] example weights ``w_i`` (>= 0).
        rows: LongTensor, the shape of ``label_mask``: the example each token position belongs to.
        label_mask: BoolTensor, True where the token is a target.
        total: the normaliser of the whole optimiser step (every micro-batch and rank):
            ``sum_j w_j n_j`` (``"token"``) or ``sum_j w_j`` (``"example"``); None = this micro-batch's.
        world_size: data-parallel ranks (their gradients are averaged).
        normalization: ``"token"``: the step loss is ``sum_i w_i sum_t l_it / sum_i w_i n_i`` (TRL's
            token mean when every ``w_i = 1``); ``"example"``: ``sum_i w_i l_i / sum_i w_i`` with
            ``l_i = sum_t l_it / n_i`` the example's mean (``mixsel train``'s loss).

    Returns:
        ``(multiplier, counts)``: Tensor of the shape of ``label_mask`` with ``m_i = w_i N W / total``
        (``"token"``) or ``w_i N W / (n_i total)`` (``"example"``) at the tokens of example ``i`` (``N``
        this micro-batch's target tokens, ``W`` the world size), so that ``sum m l / N`` is this
        micro-batch's part of the step loss; the micro-batches of a step add up to it. Tensor[k]:
        the target tokens ``n_i`` of each example.
    """
    if normalization not in ("token", "example"):
        raise ConfigError(f"loss_normalization={normalization!r} is not 'token' or 'example'")
    k = weights.numel()
    w = weights.to(torch.float32).to(label_mask.device)
    targets = rows[label_mask]
    counts = torch.bincount(targets, minlength=k).to(torch.float32)
    if normalization == "example":
        w = torch.where(counts > 0, w / counts.clamp_min(1), torch.zeros_like(w))
        counts_w = torch.where(counts > 0, weights.to(w), torch.zeros_like(w))
    else:
        counts_w = w * counts
    total = counts_w.sum() if total is None else total.to(w.device, torch.float32)
    scale = counts.sum() * world_size / total if bool(total > 0) else torch.ones((), device=w.device)
    return (w * scale)[rows], counts


class _WeightedTokens:
    """Calls the model, records per-example losses and scales TRL's per-token log-probabilities.

    TRL's ``compute_loss`` calls ``model(**inputs, fused_lm_head=True)`` and takes the loss as
    ``-sum(log_probs) / num_tokens``; multiplying each token's log-probability by its example's
    multiplier (:func:`token_weights`, normalised over the whole step) makes that the micro-batch's
    part of the step's weighted token mean, while the entropy and top-1 outputs behind TRL's metrics
    stay untouched.
    """

    def __init__(self, model: torch.nn.Module, trainer: SelectionSFTTrainer, micro: Any) -> None:
        self.model = model
        self.trainer = trainer
        self.micro = micro

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("fused_lm_head"):
            raise RuntimeError(
                "SelectionSFTTrainer weights TRL's fused-LM-head loss, which this TRL version does not call; "
                'install trl>=1.16 (pip install "mixsel[trl]")'
            )
        outputs = self.model(*args, **kwargs)
        log_probs, mask = outputs.log_probs, outputs.label_mask
        weights = self.micro.weights
        k = weights.numel()
        rows = _token_rows(kwargs, log_probs.shape, k, log_probs.device)
        trainer = self.trainer
        multiplier, counts = token_weights(
            weights,
            rows,
            mask,
            total=trainer._token_total,
            world_size=trainer.accelerator.num_processes,
            normalization=trainer.args.loss_normalization,
        )
        nll = -log_probs.detach().float().reshape(-1)
        sums = torch.zeros(k, device=log_probs.device).index_add_(0, rows.reshape(-1), nll)
        trainer.engine.record(trainer._plan, self.micro, sums / counts.clamp_min(1))
        outputs.log_probs = log_probs * multiplier.to(log_probs.dtype)
        return outputs


def _token_rows(inputs: dict[str, Any], shape: torch.Size, k: int, device: torch.device) -> torch.Tensor:
    """The example index of each (shifted) target position of a batch (padded rows or one flat row)."""
    batch, length = shape
    if batch == k:  # one row per example
        return torch.arange(k, device=device).unsqueeze(1).expand(batch, length)
    # padding-free: one row; a sequence starts where position_ids == 0 (trailing padding is clamped in)
    position_ids = inputs["position_ids"].to(device)
    starts = (position_ids[0] == 0).long().cumsum(0) - 1
    return starts[1 : length + 1].clamp(0, k - 1).unsqueeze(0)


# ---- degenerate rows: dropped with a count, as mixsel train's loading does -------------------------


def _blank(value: Any) -> bool:
    """Missing, a blank string, or a list of turns / content parts with nothing in them."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return all(_blank(value.get(key)) for key in ("content", "value", "text")) and not value.get("tool_calls")
    if isinstance(value, (list, tuple)):
        return all(_blank(item) for item in value)
    return False


def _no_reply(conversation: Any) -> bool:
    """A conversation without an assistant turn, or whose last assistant turn is empty."""
    if not isinstance(conversation, (list, tuple)):
        return False  # not a conversation: TRL says what is wrong with it
    replies = [
        t for t in conversation if isinstance(t, dict) and (t.get("role") or t.get("from")) in ("assistant", "gpt")
    ]
    return not replies or _blank(replies[-1])


def _degenerate(row: dict[str, Any], text_field: str) -> bool:
    """A row that trains on nothing it should: a conversation with no assistant reply, an empty
    completion, or an empty text (the rows ``mixsel train`` drops: :func:`mixsel.data.loading.normalize_records`)."""
    for column in ("messages", "conversations"):
        if row.get(column) is not None:
            return _no_reply(row[column])
    if "completion" in row:
        return _blank(row["completion"])
    if text_field in row:
        return _blank(row[text_field])
    return False


def drop_degenerate_rows(dataset: Any, name: str, *, text_field: str = "text", domain_column: str = "domain") -> Any:
    """``dataset`` without the rows :func:`_degenerate` finds, with one warning that counts them by domain.

    Applies to an unprepared ``datasets.Dataset`` (one with ``input_ids`` is taken as prepared, and
    other datasets are left as given).

    Raises:
        ValueError: ``name`` is a training set and a domain lost every row.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset) or "input_ids" in dataset.column_names:
        return dataset
    columns = [c for c in ("messages", "conversations", "completion", text_field) if c in dataset.column_names]
    if not columns:
        return dataset
    domains = [domain_column] if domain_column in dataset.column_names else []
    keep, dropped = [], Counter()
    index = 0
    for batch in dataset.select_columns(columns + domains).iter(batch_size=1024):
        for j in range(len(batch[columns[0]])):
            row = {c: batch[c][j] for c in columns}
            if _degenerate(row, text_field):
                dropped[str(batch[domain_column][j]) if domains else "-"] += 1
            else:
                keep.append(index)
            index += 1
    if not dropped:
        return dataset
    warnings.warn(
        f"SelectionSFTTrainer: dropped {sum(dropped.values())} of {len(dataset)} {name} rows with no assistant "
        f"reply, an empty completion or an empty {text_field!r}, as mixsel train does (per domain: "
        f"{dict(sorted(dropped.items()))})",
        stacklevel=3,
    )
    out = dataset.select(keep)
    if name == "train_dataset" and domains:
        left = Counter(str(v) for v in out[domain_column])
        empty = sorted(d for d in dropped if not left[d])
        if empty:
            raise DataError(
                f"train_dataset: domain {empty[0]!r} is empty: all of its {dropped[empty[0]]} rows have no assistant "
                "reply or an empty completion/text; fix the data or leave the domain out"
            )
    return out


def _check_rows(dataset: Any, name: str) -> None:
    """One line for an empty dataset (TRL's preparation would raise a bare ``StopIteration``)."""
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset):
        return
    fix = "pass rows, or eval_dataset=None (with eval_strategy='no')" if "eval" in name else "pass rows"
    raise DataError(f"SelectionSFTTrainer: {name} has no rows (after dropping empty ones, if a warning said so); {fix}")


def _prepared_inputs(args: Any, train_dataset: Any, eval_dataset: Any, formatting_func: Any) -> tuple[Any, Any]:
    """The train and eval sets without degenerate rows (unless TRL's preparation is skipped or a
    ``formatting_func`` builds the text), each checked to have rows."""
    skip = bool(args.dataset_kwargs and args.dataset_kwargs.get("skip_prepare_dataset", False))
    if not skip and formatting_func is None:
        text, column = args.dataset_text_field, args.domain_column
        train_dataset = drop_degenerate_rows(train_dataset, "train_dataset", text_field=text, domain_column=column)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: drop_degenerate_rows(ds, f"eval_dataset[{key!r}]", text_field=text, domain_column=column)
                for key, ds in eval_dataset.items()
            }
        else:
            eval_dataset = drop_degenerate_rows(eval_dataset, "eval_dataset", text_field=text, domain_column=column)
    _check_rows(train_dataset, "train_dataset")
    for key, ds in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
        _check_rows(ds, f"eval_dataset[{key!r}]" if key else "eval_dataset")
    return train_dataset, eval_dataset


class SelectionSFTTrainer(SelectionTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` whose every step selects its minibatch from a larger pool.

    Args:
        model: a model or a hub id / local path, as for ``trl.SFTTrainer``.
        args: a :class:`SelectionSFTConfig`.
        data_collator, train_dataset, eval_dataset, processing_class, callbacks, peft_config,
            formatting_func: as for ``trl.SFTTrainer``. Examples need the domain column
            (``args.domain_column``) next to TRL's columns (``messages``, ``prompt``/``completion``,
            ``text`` or ``input_ids``).
        selection_val_dataset: validation examples for the selection target (prepared by TRL like the
            eval set); default the prepared ``eval_dataset``.
        reference_model: frozen reference LM for ``reweighter="doremi"``.
        **kwargs: passed to ``trl.SFTTrainer``.

    Raises:
        TypeError: ``args`` is not a :class:`SelectionSFTConfig`.
        ValueError: ``packing=True``, ``eval_packing=True``, ``loss_type="dft"``, label smoothing or a
            ``compute_loss_func`` (the selection weights act on TRL's per-token NLL).
    """

    # TRL computes the loss, not SelectionTrainer.compute_loss: DoGraph's domain gradients come from a
    # separate pass over the trained rows instead of the training backward.
    _capture_gradients = False

    def __init__(
        self,
        model: Any,
        args: SelectionSFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        callbacks: list[Any] | None = None,
        selection_val_dataset: Any = None,
        reference_model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SelectionSFTConfig(output_dir="trainer_output")
        if not isinstance(args, SelectionSFTConfig):
            raise OptionError(
                f"SelectionSFTTrainer needs args=SelectionSFTConfig(...), got {type(args).__name__}; "
                "SelectionSFTConfig accepts every SFTConfig field"
            )
        if args.packing or args.eval_packing:
            raise ConfigError(
                "packing puts several examples (of any domains) in one row and drops the domain column, so "
                "per-example selection is undefined: set packing=False and eval_packing=False "
                "(padding_free=True saves the padding instead)"
            )
        if args.loss_type != "nll":
            raise ConfigError(f"loss_type={args.loss_type!r}: the selection weights act on TRL's NLL; use 'nll'")
        self._padding_free = bool(args.padding_free)
        self._selected_collator: Any = None
        self._token_total: torch.Tensor | None = None
        train_dataset, eval_dataset = _prepared_inputs(args, train_dataset, eval_dataset, kwargs.get("formatting_func"))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            selection_val_dataset=selection_val_dataset,
            reference_model=reference_model,
            **kwargs,
        )

    # ---- hooks of SelectionTrainer ----------------------------------------------------------------

    def _default_collator(self, processing_class: Any) -> Any:
        return None  # TRL builds its own (padding-free when asked)

    def _pool_collator(self, collator: Any) -> Any:
        if getattr(self, "_is_vision_dataset", False):
            raise DataError("SelectionSFTTrainer supports text datasets; TRL collates vision datasets on the fly")
        if not self._padding_free:
            return collator
        # features need one padded row per example; TRL's collator flattens the selected rows afterwards
        self._selected_collator = collator
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
        )

    def _prepare_selection_val(self, dataset: Any) -> Any:
        if dataset is None or dataset is self.eval_dataset:
            return dataset
        import datasets

        if isinstance(dataset, datasets.Dataset) and "input_ids" not in dataset.column_names:
            # the same preparation as the eval set (TRL applies it to datasets passed to `evaluate`, too)
            if self._formatting_func is None:
                dataset = drop_degenerate_rows(
                    dataset,
                    "selection_val_dataset",
                    text_field=self.args.dataset_text_field,
                    domain_column=self.args.domain_column,
                )
            _check_rows(dataset, "selection_val_dataset")
            dataset = self._prepare_dataset(
                dataset, self.processing_class, self.args, False, self._formatting_func, "selection validation"
            )
        return dataset

    def _micro_inputs(self, micro: Any) -> dict[str, Any]:
        if self._selected_collator is None:
            return super()._micro_inputs(micro)
        rows = micro.batch
        examples = []
        for i in range(len(rows)):
            keep = rows.attention_mask[i].bool()
            examples.append({key: getattr(rows, key)[i][keep].tolist() for key in ("input_ids", "labels")})
        return {**self._selected_collator(examples), MICRO_KEY: micro}

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        samples, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        plan = self._plan
        if plan is not None:  # the step's normaliser over every rank (token_weights)
            from mixsel.distributed import all_reduce_sum
            from mixsel.features.loss import target_mask

            counts = target_mask(plan.trained.labels).sum(1).to(torch.float32)
            if self.args.loss_normalization == "example":
                counts = (counts > 0).to(torch.float32)
            self._token_total = all_reduce_sum((plan.weights * counts).sum().clone())
        return samples, items

    def _weighted_loss(self, model: torch.nn.Module, inputs: dict[str, Any], micro: Any, return_outputs: bool) -> Any:
        # TRL's own compute_loss (its loss and metrics), with each example's tokens weighted
        wrapped = _WeightedTokens(model, self, micro)
        return SFTTrainer.compute_loss(self, wrapped, inputs, return_outputs=return_outputs)
