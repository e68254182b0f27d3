"""The mixsel training loop: sample a pool, select a minibatch, take a weighted step. Read top to bottom.

Launch::

    mixsel train                                            # the embedded default (tiny Llama, 7 domains)
    mixsel train --config configs/default.yaml train.max_steps=50 selection.method=partitionsel
    python -m mixsel.train --config configs/default.yaml    # the same without the console script
    torchrun --nproc_per_node=2 $(which mixsel) train --config configs/default.yaml
    torchrun --nproc_per_node=2 $(which mixsel) train train.distributed_selection=gather \
        selection.method=partitionsel selection.features.projection_dim=256

Each step:

1. a :class:`~mixsel.data.CandidateSampler` draws ``train.pool_size`` example ids following the
   domain weights (natural proportions, or a reweighter's weights in ``sampling`` mode);
2. an :class:`~mixsel.step.OnlineSelector` computes the features the selector needs and picks
   ``train.batch_size`` of them (a :class:`mixsel.Selection`, identical on every rank). Under
   torchrun, ``train.distributed_selection`` says who computes the features: ``global`` (every rank,
   the whole pool), ``gather`` (each rank its shard, then all-gathered) or ``local`` (each rank
   selects its share from its own shard); see ``docs/distributed.md``;
3. the model takes one optimiser step on the selected examples: the loss is the weighted mean of
   per-example losses (selection weights if ``selection.use_weights``, times per-domain weights if the
   reweighter acts on the ``loss``), accumulated over micro-batches. Each rank runs its own share of
   the selection and the loss is normalised by the global selected weight, so shares may differ in
   size; ``train.autocast=bf16`` runs this forward under ``torch.autocast``;
4. per-domain statistics (:class:`mixsel.DomainStats`, all-reduced) update the reweighter;
5. every ``eval.every`` steps: per-domain validation loss and exact match; metrics go to
   ``<output_dir>/metrics.jsonl``; checkpoints are atomic and verified, and ``train.resume=true``
   continues exactly (:mod:`mixsel.checkpoint`).

Before anything is loaded or written, the config, the method names and options, the device, the
model paths and the run folder are checked (:func:`mixsel.preflight.preflight`): a folder holding another run is
refused unless ``--resume`` (same run-defining config, :mod:`mixsel.runfolder`) or ``--overwrite``.
A step whose loss or gradient norm is not finite, whose loss exceeds ``train.max_loss_factor`` x
ln(vocab size) (the loss of uniform guessing), that multiplies the weight norm by more than
``train.max_weight_growth``, or after which the gradient vanishes for 3 steps in a row stops the run
as diverged, with the last good checkpoint intact; non-finite weights are never saved.

The run folder gets ``config.yaml``, ``metrics.jsonl``, ``result.json`` and ``final/`` (the model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixsel import bookkeeping
from mixsel.checkpoint import (
    CHECKPOINT_NAME,
    read_manifest,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mixsel.config import (
    RESULT_SAFE_FIELDS,
    ExperimentConfig,
    config_fingerprint,
    config_to_dict,
    run_fields,
    save_config,
)
from mixsel.distributed import all_gather_object, all_reduce_sum, barrier, init_world
from mixsel.preflight import preflight
from mixsel.registry import get_reweighter
from mixsel.runfolder import clear_run
from mixsel.step import OnlineSelector
from mixsel.types import DomainStats

__all__ = ["default_threads", "main", "summarize_mixture", "train"]

log = logging.getLogger("mixsel.train")


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _lr_lambda(cfg: ExperimentConfig):
    warm, total, floor = cfg.train.warmup_steps, max(cfg.train.max_steps, 1), cfg.train.min_lr_ratio

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _restate_schedule(optimizer: Any, scheduler: Any, cfg: ExperimentConfig) -> None:
    """After loading a checkpoint, make this config's ``train.lr``, ``weight_decay`` and schedule
    (``max_steps``) the ones in force: a loaded optimizer keeps the saved ones otherwise. With an
    unchanged config the values are the same ones LambdaLR computes, bit for bit."""
    fn = _lr_lambda(cfg)
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.train.lr
        group["weight_decay"] = cfg.train.weight_decay
        group["lr"] = cfg.train.lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover - non-Unix
        return float("nan")


def _autocast(name: str | None, device: torch.device) -> Any:
    """``torch.autocast`` for ``train.autocast`` (``"bf16"``), or a no-op context for ``None``."""
    import contextlib

    if name is None or name in ("none", "false"):
        return contextlib.nullcontext()
    if name not in ("bf16", "bfloat16"):
        raise ValueError(
            f"train.autocast={name!r} is not supported; use 'bf16' (fp16 would need a loss scaler) or null"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _selector_state(state: dict[str, Any], world: Any) -> dict[str, Any]:
    """This rank's selector state from a checkpoint (``local`` selection saves one per rank)."""
    ranks = state.get("selector_ranks")
    if ranks is None:
        return state["selector"]
    if len(ranks) != world.world_size:
        raise ValueError(
            f"the checkpoint holds {len(ranks)} per-rank selector states (distributed_selection='local') but "
            f"this run has {world.world_size} ranks: resume with --nproc_per_node={len(ranks)}"
        )
    return ranks[world.rank]


def _weights_from(options: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """Resolve ``reweighting.options.weights_from`` (the two-stage DoReMi recipe) into ``weights``.

    ``weights_from`` names a finished run's ``result.json`` (or its folder): its ``average_weights``
    (DoReMi's stage-one output, Xie et al. 2023 Sec. 2) or else its ``final_weights`` become the
    ``weights`` option, as a ``{domain: weight}`` mapping, so a domain missing from the file fails
    loudly in the reweighter instead of being silently misaligned.
    """
    source = options.pop("weights_from", None)
    if source is None:
        return options
    if "weights" in options:
        raise ValueError("reweighting.options has both weights and weights_from: keep one")
    path = Path(source)
    if path.is_dir():
        path = path / "result.json"
    if not path.exists():
        raise FileNotFoundError(
            f"reweighting.options.weights_from={source!r}: {path} not found; point it at a finished run's "
            "result.json (e.g. runs/doremi_proxy/result.json)"
        )
    result = json.loads(path.read_text())
    values = result.get("average_weights") or result.get("final_weights")
    if values is None or "domains" not in result:
        raise ValueError(f"{path} has no domains / average_weights / final_weights: is it a mixsel result.json?")
    loaded = dict(zip(result["domains"], values, strict=True))
    missing = [d for d in domains if d not in loaded]
    if missing:
        raise ValueError(f"{path} has no weights for domains {missing} of this run (it has {sorted(loaded)})")
    return {**options, "weights": {d: float(loaded[d]) for d in domains}}


def default_threads() -> int:
    """``train.threads=null``: the physical cores this process may use, shared among the processes that
    ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``), at least 1.

    Physical, not logical, cores: hyper-threads and a second job on the same cores make every thread
    wait on the others (oversubscription), which slows small models by several times.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        available = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or available
    except ImportError:  # torch's own default is the physical core count
        physical = torch.get_num_threads()
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(min(available, physical) // local, 1)


def _set_threads(cfg: ExperimentConfig) -> str:
    """Apply ``train.threads`` (or the default); returns how the count was chosen, for the start lines."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
        return f"{cfg.train.threads} (train.threads)"
    if "OMP_NUM_THREADS" in os.environ:
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    threads = default_threads()
    torch.set_num_threads(threads)
    return f"{threads} (physical cores / processes; set train.threads to share the machine)"


def _seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy from the run seed (their states go into checkpoints)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def summarize_mixture(mixture: Any, eval_cfg: Any = None) -> str:
    """The data summary printed at the start of a run (:func:`mixsel.data.summary.format_data_summary`:
    the resolved source, per-domain rows per split, truncation and what is scored).

    Warns (through the log) about a domain without validation rows: its validation loss is not
    measured and no validation anchor comes from it.
    """
    from mixsel.data.summary import format_data_summary

    for d, count in enumerate(mixture.validation.domain_counts().tolist()):
        if count == 0:
            log.warning(
                "domain %r has no validation rows: its validation loss is not measured and no selection anchor "
                "comes from it; raise data.val_per_domain or add validation rows",
                mixture.domains[d],
            )
    return format_data_summary(mixture.summary, eval_cfg)


def _last_good(out: Path) -> str:
    """Where a stopped run can continue from, for divergence messages."""
    manifest = read_manifest(out / CHECKPOINT_NAME)
    if manifest is None:
        return "no checkpoint was saved yet (train.save_every=N keeps one every N steps)"
    return f"the last good checkpoint (step {manifest.get('step')}) in {out / CHECKPOINT_NAME} is intact"


def _check_finite_weights(model: torch.nn.Module, step: int, out: Path) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(
            f"training diverged: the weights hold NaN or inf after step {step} ({', '.join(bad[:2])}) "
            f"and were not saved; {_last_good(out)}: lower train.lr or raise train.grad_clip, then --resume"
        )


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling ``.<name>.tmp`` and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _weight_norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all ``params`` together."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach()) for p in params])))


# steps in a row with a zero gradient (and a positive loss) after which a model counts as dead
_DEAD_STEPS = 3


def _backward(
    model: torch.nn.Module,
    pool: dict[str, torch.Tensor],
    chosen: torch.Tensor,
    weights: torch.Tensor,
    total_weight: torch.Tensor,
    *,
    micro_batch_size: int,
    device: torch.device,
    autocast: Any,
    world_size: int,
    capture: Any,
    step: int,
    out: Path,
) -> tuple[list[torch.Tensor], int]:
    """Step 3's forward and backward passes over this rank's selected rows, in micro-batches.

    Each micro-batch adds its share of the weighted mean of per-example losses over the whole
    selection (``total_weight`` is the selected weight summed over ranks; the gradient all-reduce
    averages over ``world_size``), so the accumulated gradient is the gradient of that mean.

    Returns:
        The per-token losses of each micro-batch (for the domain statistics) and the model's output
        size (0 when this rank trained no row).
    """
    from mixsel.features.loss import target_mask, token_losses

    losses: list[torch.Tensor] = []
    vocab = 0
    for s in range(0, len(chosen), micro_batch_size):
        rows = chosen[s : s + micro_batch_size]
        batch = {key: pool[key][rows].to(device) for key in bookkeeping.MODEL_KEYS}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        vocab = logits.shape[-1]
        tok = token_losses(logits.float(), batch["labels"])  # per token, for DoReMi's per-token excess
        per_ex = tok.sum(1) / target_mask(batch["labels"]).sum(1).clamp_min(1)
        if not torch.isfinite(per_ex).all():
            raise FloatingPointError(
                f"training diverged: non-finite loss at step {step + 1} (domains "
                f"{pool['domain_ids'][rows].tolist()}); {_last_good(out)}: lower train.lr or check the "
                "data, then resume from the last checkpoint with --resume (train.resume=true)"
            )
        if capture is not None:
            capture.watch(per_ex)
        share = weights[s : s + micro_batch_size].to(device)
        (per_ex * share).sum().div(total_weight.to(device)).mul(world_size).backward()
        losses.append(tok.detach().cpu())
    return losses, vocab


def _optimizer_step(
    params: list[torch.nn.Parameter], optimizer: Any, cfg: ExperimentConfig, world: Any, *, step: int, out: Path
) -> float:
    """Average the gradients over ranks, clip them, step the optimiser; returns the total gradient norm.

    The norm is the one before clipping to ``train.grad_clip`` (0 = measured only). Stops the run as
    diverged, with the weights not updated, when the norm is not finite, and after the update when
    it multiplied the weight norm by more than ``train.max_weight_growth``.
    """
    if world.distributed:
        for p in params:  # a rank with no selected example still joins the all-reduce, with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad).div_(world.world_size)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or math.inf))
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"training diverged: the gradient norm is {grad_norm} at step {step + 1} (the weights were not "
            f"updated); {_last_good(out)}: lower train.lr (now {cfg.train.lr:g}) or set train.grad_clip, "
            "then --resume"
        )
    norm_before = _weight_norm(params) if cfg.train.max_weight_growth else 0.0
    optimizer.step()
    if cfg.train.max_weight_growth:
        growth = _weight_norm(params) / max(norm_before, 1.0)
        if not growth <= cfg.train.max_weight_growth:  # also NaN
            raise FloatingPointError(
                f"training diverged: step {step + 1} multiplied the weight norm by {growth:.3g} (more than "
                f"train.max_weight_growth={cfg.train.max_weight_growth:g}); {_last_good(out)}: lower train.lr "
                f"(now {cfg.train.lr:g}), then --resume"
            )
    return grad_norm


def _check_learning(
    train_loss: float, grad_norm: float, vocab: int, dead_steps: int, cfg: ExperimentConfig, *, step: int, out: Path
) -> int:
    """Stop a run whose loss exceeds ``train.max_loss_factor`` x ln(vocab) or whose gradient died.

    Returns:
        The number of steps in a row, up to this one, with a zero gradient and a positive loss.
    """
    ceiling = cfg.train.max_loss_factor * math.log(vocab) if cfg.train.max_loss_factor and vocab > 1 else None
    if ceiling is not None and train_loss > ceiling:
        raise FloatingPointError(
            f"training diverged: the train loss {train_loss:.4g} at step {step + 1} exceeds train.max_loss_factor="
            f"{cfg.train.max_loss_factor:g} x ln(vocab size {vocab}) = {ceiling:.4g} (uniform guessing scores "
            f"{math.log(vocab):.3g}); {_last_good(out)}: lower train.lr (now {cfg.train.lr:g}), then --resume"
        )
    dead_steps = dead_steps + 1 if grad_norm == 0.0 and train_loss > 0 else 0
    if dead_steps >= _DEAD_STEPS:
        raise FloatingPointError(
            f"training diverged: the gradient has been exactly 0 for {dead_steps} steps (up to step {step + 1}) "
            f"with a train loss of {train_loss:.4g}: the model stopped learning, typically after a too-large "
            f"step; {_last_good(out)}: lower train.lr (now {cfg.train.lr:g}), then --resume"
        )
    return dead_steps


def _domain_gradient_stats(
    stats: DomainStats,
    model: torch.nn.Module,
    pool: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    chosen_domains: torch.Tensor,
    val_split: Any,
    capture: Any,
    cfg: ExperimentConfig,
    world: Any,
    *,
    pad_id: int,
    with_validation: bool,
    grad_kw: dict[str, Any],
) -> None:
    """Step 4 for DoGraph: fill ``stats.grad`` (and ``stats.val_grad`` when ``with_validation``).

    ``reweighting.grad_rows=trained`` projects the gradients ``capture`` kept from the training
    backward; ``pool`` runs a separate pass over this rank's share of the pool.
    """
    num_domains = len(stats.counts)
    rc = cfg.reweighting
    val_batch = None
    if with_validation:
        val_rows = bookkeeping.balanced_rows(val_split.domain_ids, num_domains, rc.val_per_domain)
        val_batch = val_split.collate(val_rows, pad_id)
    if capture is not None:  # the trained rows, captured in the backward
        stats.grad = bookkeeping.captured_domain_gradients(
            capture, trained, chosen_domains, num_domains, model=model, **grad_kw
        )
        if val_batch is not None:
            stats.val_grad = bookkeeping.validation_gradient(model, val_batch, **grad_kw)
    else:  # reweighting.grad_rows=pool: this rank's share of the pool, in a separate pass
        rows = torch.arange(pool["input_ids"].shape[0])[world.rank :: world.world_size]
        stats.grad, stats.val_grad = bookkeeping.domain_gradients(
            model,
            {key: pool[key][rows] for key in bookkeeping.MODEL_KEYS},
            pool["domain_ids"][rows],
            num_domains,
            val_batch=val_batch,
            **grad_kw,
        )


def _check_anchors(cfg: ExperimentConfig, selector: Any, val_rows: int) -> None:
    """Refuse a selector that matches validation anchors when the validation split is empty."""
    if val_rows == 0 and cfg.selection.features.val_anchors and selector.requires & {"val_scores", "val_gram"}:
        raise ValueError(
            f"selection.method={cfg.selection.method!r} needs validation anchors but the validation split is empty: "
            "set data.val_per_domain >= 1 (or give validation rows in data.split_column)"
        )


def _build_reweighter(cfg: ExperimentConfig, domains: list[str], *, update_every: int) -> Any:
    """The ``reweighting.method`` reweighter with its ``reweighting.options`` (one clear line for a bad one)."""
    options = _weights_from(dict(cfg.reweighting.options), domains)
    try:
        return get_reweighter(cfg.reweighting.method, domains=domains, update_every=update_every, **options)
    except TypeError as err:  # an unknown or missing keyword option
        raise ValueError(
            f"reweighting.options for {cfg.reweighting.method!r}: {err}; docs/reweighting.md lists the options"
        ) from None


def _reference_model(cfg: ExperimentConfig, tokenizer: Any, device: torch.device) -> torch.nn.Module | None:
    """DoReMi's frozen reference model (``reweighting.reference_model``), or ``None``."""
    if not cfg.reweighting.reference_model:
        return None
    from mixsel.config import ModelConfig
    from mixsel.model import build_model

    reference = build_model(
        ModelConfig(name_or_path=cfg.reweighting.reference_model), tokenizer, field="reweighting.reference_model"
    ).to(device)
    return reference.eval().requires_grad_(False)


def _restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    sampler: Any,
    selector: Any,
    reweighter: Any,
    cfg: ExperimentConfig,
    world: Any,
) -> int:
    """Load a checkpoint's states into the run's components (exact resume); returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restate_schedule(optimizer, scheduler, cfg)
    sampler.load_state_dict(state["sampler"])
    selector.load_state_dict(_selector_state(state, world))
    reweighter.load_state_dict(state["reweighter"])
    set_rng_state(state["rng"])
    log.info("resumed from step %d", state["step"])
    return int(state["step"])


def _open_run_folder(out: Path, cfg: ExperimentConfig, mode: str, world: Any, start: int) -> list[Any]:
    """Write the run folder, only now that config, data and model are known to work; returns the loggers.

    Clears it first under ``mode="overwrite"``; on a resume, ``metrics.jsonl`` and
    ``selections.jsonl`` keep their lines up to the resumed step (all are dropped on a fresh start).
    Other ranks than the main one get no loggers.
    """
    from mixsel.logging import build_loggers, truncate_jsonl

    barrier()  # every rank has checked the folder before rank 0 writes into it
    if not world.is_main:
        return []
    remove_leftovers(out)
    if mode == "overwrite":
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    keep = start + 1 if start else 0
    loggers = build_loggers(out, cfg.train.report_to, truncate_from=keep, run_name=cfg.name, config=config_to_dict(cfg))
    if cfg.train.log_selections:
        truncate_jsonl(out / "selections.jsonl", keep)
    return loggers


def _write_final(
    out: Path,
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    result: dict[str, Any],
    generations: list[dict[str, Any]],
) -> None:
    """The run's plots, ``final/`` (model and tokenizer), ``generations.jsonl`` and, last, ``result.json``."""
    from mixsel.model import quiet_hf_progress
    from mixsel.plots import plot_run

    if cfg.train.plots:
        plot_run(out)
    final_dir = out / "final"
    with quiet_hf_progress():
        model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    if generations:
        _write_atomic(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in generations))
    # written last: a result.json marks a finished run
    _write_atomic(out / "result.json", json.dumps(result, indent=2))


def train(cfg: ExperimentConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one experiment; returns the content of ``result.json``.

    ``progress`` shows the progress bar and prints the start lines (run folder, data, threads, the
    data summary) on stdout.
    """
    from tqdm.auto import tqdm

    from mixsel.data.build import load_mixture
    from mixsel.data.sampler import CandidateSampler
    from mixsel.evaluate import domain_losses, exact_match
    from mixsel.features.loss import target_mask
    from mixsel.logging import check_report_to, launch_message, progress_postfix
    from mixsel.model import build_model, build_tokenizer

    # ---- checks before anything is loaded or written -----------------------------------------
    check_report_to(cfg.train.report_to)
    selector, mode, state = preflight(cfg)
    world = init_world(cfg.train.device)
    device = _device(cfg.train.device, world.local_rank)
    threads = _set_threads(cfg)
    _seed_everything(cfg.seed)
    out = Path(cfg.train.output_dir)
    say = print if (progress and world.is_main) else (lambda *args, **kwargs: None)
    verb = {"fresh": "a new run", "overwrite": "replacing the earlier run", "resume": "resuming"}[mode]
    if state is not None:
        verb += f" from step {state['step']}"
    say(f"run folder: {out.absolute()} ({verb})", flush=True)
    say(f"threads: {threads}", flush=True)

    # ---- data and model ----------------------------------------------------------------------
    tokenizer = build_tokenizer(cfg.model)
    mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
    say(summarize_mixture(mixture, cfg.eval), flush=True)
    domains, train_split = mixture.domains, mixture.train
    num_domains = len(domains)
    _check_anchors(cfg, selector, len(mixture.validation))
    pad_id = tokenizer.pad_token_id
    model = build_model(cfg.model, tokenizer).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    # ---- selection and reweighting -----------------------------------------------------------
    k, pool_size = cfg.train.batch_size, cfg.train.pool_size  # validate(cfg) checked k <= pool_size
    use_weights = bookkeeping.resolve_use_weights(selector, cfg.selection.use_weights)
    online = OnlineSelector(
        selector,
        cfg.selection.features,
        num_domains,
        seed=cfg.seed,
        diagnostics=cfg.selection.diagnostics,
        mode=cfg.train.distributed_selection,
        world=world,
        source_sizes=bookkeeping.source_sizes(train_split.domain_ids, num_domains),
    )
    launch = launch_message(
        "mixsel train",
        world_size=world.world_size,
        backend=torch.distributed.get_backend() if world.distributed else "none",
        mode=online.mode,
        selector=cfg.selection.method,
        batch=k,
        pool=pool_size,
        rank=world.rank,
    )
    if progress:  # where the progress bar goes: seen on every rank without any logging set up
        tqdm.write(launch, file=sys.stderr)
    else:
        log.info(launch)
    # reweighting.amortize: the loop computes the statistics and updates the reweighter every update_every steps
    update_every = cfg.reweighting.update_every
    amortize = cfg.reweighting.amortize and update_every > 1
    reweighter = _build_reweighter(cfg, domains, update_every=1 if amortize else update_every)
    reference = _reference_model(cfg, tokenizer, device)
    sampler = CandidateSampler(train_split.domain_ids, pool_size, seed=cfg.seed, num_domains=num_domains)
    autocast = _autocast(cfg.train.autocast, device)

    # ---- resume ------------------------------------------------------------------------------
    start = 0
    if state is not None:
        start = _restore(state, model, optimizer, scheduler, sampler, selector, reweighter, cfg, world)
    state = None  # the checkpoint's tensors are in the model and optimizer now

    # ---- the run folder: written only now that config, data and model are known to work ------
    loggers = _open_run_folder(out, cfg, mode, world, start)
    fingerprint = config_fingerprint(cfg)  # what a resume must match
    result_fingerprint = config_fingerprint(cfg, RESULT_SAFE_FIELDS)  # what mixsel compare resumes on
    run_config = json.loads(json.dumps(run_fields(cfg), default=str))

    def log_metrics(metrics: dict[str, Any], step: int) -> None:
        for logger in loggers:
            logger.log(metrics, step)

    def checkpoint(step: int) -> None:
        # "local" selection: every rank's selector has its own state (a collective, on all ranks)
        selectors = all_gather_object(selector.state_dict()) if online.mode == "local" else None
        _check_finite_weights(model, step, out)
        if world.is_main:
            save_checkpoint(
                out,
                {
                    "step": step,
                    "fingerprint": fingerprint,
                    "run_config": run_config,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sampler": sampler.state_dict(),
                    "selector": selector.state_dict(),
                    **({"selector_ranks": selectors} if selectors is not None else {}),
                    "reweighter": reweighter.state_dict(),
                    "rng": rng_state(),
                },
                meta={"fingerprint": fingerprint, "result_fingerprint": result_fingerprint},
            )
        barrier()

    def evaluate(
        split: Any, prefix: str, generate: bool = False, records: list[dict[str, Any]] | None = None
    ) -> dict[str, float]:
        metrics = domain_losses(
            model, split, pad_token_id=pad_id, max_per_domain=cfg.eval.max_per_domain, prefix=prefix
        )
        if generate and cfg.eval.exact_match > 0:
            metrics.update(
                exact_match(
                    model,
                    tokenizer,
                    split,
                    limit=cfg.eval.exact_match,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.generation_batch_size,
                    prefix=prefix,
                    checker=cfg.eval.answer_checker,
                    tolerance=cfg.eval.answer_tolerance,
                    records=records,
                )
            )
        return metrics

    # ---- the loop ----------------------------------------------------------------------------
    val_split = mixture.validation
    vocab = 0  # the model's output size, read from the first logits (ln V = uniform guessing)
    dead_steps = 0  # steps in a row with a zero gradient and a positive loss
    t_start = time.perf_counter()
    bar = tqdm(
        range(start, cfg.train.max_steps),
        initial=start,
        total=cfg.train.max_steps,
        disable=not (progress and world.is_main),
        desc=f"train[{cfg.selection.method}]",
    )
    for step in bar:
        t0 = time.perf_counter()
        weights = reweighter.weights
        # loss-mode weights leave the pool to the sampler: natural proportions, or the reweighter's
        # proposal (DoReMi's proxy draws from the uniform mixture, Algorithm 1)
        sample_w, loss_w = bookkeeping.mixture_weights(reweighter)

        # 1. candidate pool (the same global pool on every rank)
        pool_ids = sampler.draw(sample_w)
        pool = train_split.collate(pool_ids, pad_id)

        # 2. selection (validation anchors drawn per step, identically on every rank)
        fc = cfg.selection.features
        anchors = bookkeeping.draw_anchors(
            val_split.domain_ids, fc.val_anchors, seed=cfg.seed, step=step, sampling=fc.anchor_sampling
        )
        val_batch = val_split.collate(anchors, pad_id)
        lr = scheduler.get_last_lr()[0]
        result = online(model, pool, k, step=step, lr=lr, val_batch=val_batch, domain_weights=weights)
        sel = result.selection
        t1 = time.perf_counter()

        # 3. weighted train step on this rank's share of the selection
        mine = result.local if result.local is not None else sel
        chosen = mine.indices
        chosen_domains = pool["domain_ids"][chosen]
        w = bookkeeping.example_weights(mine, chosen_domains, use_weights=use_weights, loss_weights=loss_w)
        total_w = all_reduce_sum(w.sum().clone()).clamp_min(1e-12)
        optimizer.zero_grad(set_to_none=True)
        mb = cfg.train.micro_batch_size
        stats_step = bookkeeping.is_stats_step(step, update_every, amortize)
        rc = cfg.reweighting
        grad_kw = {"source": fc.source, "modules": fc.modules, "projection_dim": rc.projection_dim, "seed": cfg.seed}
        capture = None  # DoGraph's domain gradients of the trained rows, from this very backward
        if reweighter.needs_grad and stats_step and rc.grad_rows == "trained":
            capture = bookkeeping.gradient_capture(model, **grad_kw)
        with capture if capture is not None else contextlib.nullcontext():
            losses, step_vocab = _backward(
                model,
                pool,
                chosen,
                w,
                total_w,
                micro_batch_size=mb,
                device=device,
                autocast=autocast,
                world_size=world.world_size,
                capture=capture,
                step=step,
                out=out,
            )
        vocab = step_vocab or vocab  # a rank that trained no row keeps the size it saw last
        grad_norm = _optimizer_step(params, optimizer, cfg, world, step=step, out=out)
        scheduler.step()
        t2 = time.perf_counter()

        # 4. domain statistics (summed over ranks) -> reweighter
        trained = {key: pool[key][chosen] for key in bookkeeping.MODEL_KEYS}
        stats = bookkeeping.domain_stats(
            chosen_domains,
            torch.cat(losses) if losses else torch.zeros(0),
            num_domains,
            step=step,
            ref_losses=bookkeeping.reference_losses(reference, trained, mb)
            if reference is not None and stats_step
            else None,
            mask=target_mask(trained["labels"]),
        )
        if reweighter.needs_grad and stats_step:  # domain gradient statistics (DoGraph)
            _domain_gradient_stats(
                stats,
                model,
                pool,
                trained,
                chosen_domains,
                val_split,
                capture,
                cfg,
                world,
                pad_id=pad_id,
                with_validation=bookkeeping.is_update_step(step, update_every) or amortize,
                grad_kw=grad_kw,
            )
        bookkeeping.reduce_stats(stats, all_reduce_sum)
        if stats_step:  # the reweighter accumulates and acts every update_every calls (amortize: every call)
            reweighter.update(stats)
        t3 = time.perf_counter()

        # 5. logging, evaluation, checkpoints
        metrics: dict[str, Any] = dict(result.metrics)
        captured = capture.seconds if capture is not None else 0.0  # projecting DoGraph's captured gradients
        metrics.update(
            {
                "train/loss": float(stats.loss_sum.sum() / stats.counts.sum().clamp_min(1)),
                "train/lr": lr,
                "time/select": t1 - t0,
                "time/train": t2 - t1 - captured,
                "time/reweight": t3
                - t2
                + captured,  # reference losses (DoReMi), domain gradients (DoGraph), the update
                "time/step": time.perf_counter() - t0,
            }
        )
        metrics["train/grad_norm"] = grad_norm
        dead_steps = _check_learning(metrics["train/loss"], grad_norm, vocab, dead_steps, cfg, step=step, out=out)
        metrics.update({k: v for k, v in reweighter.log_dict().items() if not k.startswith("weights/")})
        comp = stats.counts / stats.counts.sum().clamp_min(1)
        for d, name in enumerate(domains):
            metrics[f"select/frac/{name}"] = float(comp[d])
            metrics[f"weights/{name}"] = float(weights[d])
        if (step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.max_steps:
            metrics.update(evaluate(val_split, "val"))
        if world.is_main and cfg.train.log_selections:
            with open(out / "selections.jsonl", "a") as fh:
                ids = pool_ids[sel.indices].tolist()
                row = {"step": step + 1, "examples": ids, "pool_index": sel.indices.tolist()}
                fh.write(json.dumps({**row, "weights": sel.weights.tolist()}) + "\n")
        if world.is_main and ((step + 1) % cfg.train.log_every == 0 or "val/loss_mean" in metrics):
            log_metrics(metrics, step + 1)
        if world.is_main:
            bar.set_postfix(progress_postfix(metrics), refresh=False)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            checkpoint(step + 1)
        if cfg.train.stop_after is not None and step + 1 >= cfg.train.stop_after:
            # a planned interruption (e.g. a time limit): the schedule still spans max_steps
            checkpoint(step + 1)
            for logger in loggers:
                logger.close()
            log.info("stopping after step %d (train.stop_after); continue with --resume", step + 1)
            return {"stopped_at": step + 1}

    # ---- final evaluation on the test split and result.json ----------------------------------
    wall = time.perf_counter() - t_start
    generations: list[dict[str, Any]] = []  # one record per exact-match prompt -> generations.jsonl
    test = evaluate(mixture.test, "test", generate=True, records=generations)  # generation: final test only
    final_val = evaluate(val_split, "val")
    result = {
        "name": cfg.name,
        "method": cfg.selection.method,
        "reweighting": cfg.reweighting.method,
        "steps": cfg.train.max_steps,
        "seed": cfg.seed,
        "wall_time_s": wall,
        "peak_memory_mb": _peak_memory_mb(device),
        "domains": domains,
        "final_weights": [float(x) for x in reweighter.weights],
        **(
            {"average_weights": [float(x) for x in reweighter.average_weights]}
            if reweighter.average_weights is not None
            else {}
        ),
        **final_val,
        **test,
        "config": config_to_dict(cfg),
    }
    _check_finite_weights(model, cfg.train.max_steps, out)
    if world.is_main:
        for logger in loggers:
            logger.close()
        _write_final(out, cfg, model, tokenizer, result, generations)
    if cfg.train.save_every:  # on every rank: checkpoint() is a collective
        checkpoint(cfg.train.max_steps)
    barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m mixsel.train ...``: the same as ``mixsel train ...`` (flags, errors, exit status)."""
    import sys

    from mixsel.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
