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

After the last step the trained state is checkpointed before the final evaluation and writes, so a
failure there (an answer checker, a full disk) leaves a run that ``--resume`` completes. SIGTERM or
SIGINT while the steps run: the step finishes, a checkpoint is written, and :class:`StoppedBySignal`
is raised (``mixsel train`` exits with 143 or 130; ``docs/runs.md``).

The run folder gets ``config.yaml``, ``metrics.jsonl``, ``result.json`` and ``final/`` (the model).
``result.json``'s ``time`` holds the wall seconds of this process by part: data, model, train (the
step loop without its evaluations), eval (every evaluation, generation included) and total.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixsel.checkpoint import (
    CHECKPOINT_NAME,
    free_bytes,
    read_manifest,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
    size_text,
    space_note,
    state_bytes,
    write_failure,
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
from mixsel.engine import Engine, StepPlan, build_engine
from mixsel.errors import ConfigError, DivergedError
from mixsel.preflight import preflight
from mixsel.runfolder import clear_run, record_run

__all__ = ["StoppedBySignal", "default_threads", "main", "summarize_mixture", "train"]

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
        raise ConfigError(
            f"train.autocast={name!r} is not supported; use 'bf16' (fp16 would need a loss scaler) or null"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _selector_state(state: dict[str, Any], world: Any) -> dict[str, Any]:
    """This rank's selector state from a checkpoint (``local`` selection saves one per rank)."""
    ranks = state.get("selector_ranks")
    if ranks is None:
        return state["selector"]
    if len(ranks) != world.world_size:
        raise ConfigError(
            f"the checkpoint holds {len(ranks)} per-rank selector states (distributed_selection='local') but "
            f"this run has {world.world_size} ranks: resume with --nproc_per_node={len(ranks)}"
        )
    return ranks[world.rank]


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


def _last_good(out: Path, fix: str) -> str:
    """Where a diverged run can continue from and the commands that do it, for divergence messages.

    Args:
        out: the run folder.
        fix: what to change, e.g. ``"lower train.lr (now 0.1)"``.

    Returns:
        With a checkpoint: ``fix``, then ``--resume --force-resume`` (a changed ``train.lr`` or
        ``train.grad_clip`` alters the run, which a plain ``--resume`` refuses); without one: ``fix``,
        then start again with ``--overwrite``.
    """
    manifest = read_manifest(out / CHECKPOINT_NAME)
    if manifest is None:
        return (
            f"no checkpoint was saved yet (train.save_every=N keeps one every N steps): {fix}, then start again "
            "with --overwrite"
        )
    return (
        f"the last good checkpoint (step {manifest.get('step')}) in {out / CHECKPOINT_NAME} is intact: {fix}, then "
        "continue from it with --resume --force-resume (a new train.lr or train.grad_clip is a config change)"
    )


def _check_finite_weights(model: torch.nn.Module, step: int, out: Path) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergedError(
            f"training diverged: the weights hold NaN or inf after step {step} ({', '.join(bad[:2])}) "
            f"and were not saved; {_last_good(out, 'lower train.lr or set train.grad_clip')}"
        )


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling ``.<name>.tmp`` and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _weight_norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all ``params`` together."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach()) for p in params])))


# steps in a row with a zero gradient (and a positive loss) after which a model counts as dead
_DEAD_STEPS = 3


def _backward(
    model: torch.nn.Module, engine: Engine, plan: StepPlan, *, device: torch.device, autocast: Any, out: Path
) -> int:
    """Step 3's forward and backward passes over this rank's selected rows, in micro-batches.

    Each micro-batch adds its share of the step's weighted loss (:meth:`mixsel.engine.Engine.loss`),
    so the accumulated gradient is the gradient of the weighted mean over the whole selection.

    Returns:
        The model's output size (0 when this rank trained no row).
    """
    vocab = 0
    for micro in plan.micro_batches:
        with autocast:
            logits = model(**micro.batch.forward_inputs(device)).logits
        vocab = logits.shape[-1]
        try:
            loss = engine.loss(plan, micro, logits)
        except DivergedError as err:
            raise DivergedError(f"{err}; {_last_good(out, 'lower train.lr or check the data')}") from None
        loss.backward()
    return vocab


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
        raise DivergedError(
            f"training diverged: the gradient norm is {grad_norm} at step {step + 1} (the weights were not "
            f"updated); {_last_good(out, f'lower train.lr (now {cfg.train.lr:g}) or set train.grad_clip')}"
        )
    norm_before = _weight_norm(params) if cfg.train.max_weight_growth else 0.0
    optimizer.step()
    if cfg.train.max_weight_growth:
        growth = _weight_norm(params) / max(norm_before, 1.0)
        if not growth <= cfg.train.max_weight_growth:  # also NaN
            raise DivergedError(
                f"training diverged: step {step + 1} multiplied the weight norm by {growth:.3g} (more than "
                f"train.max_weight_growth={cfg.train.max_weight_growth:g}); "
                f"{_last_good(out, f'lower train.lr (now {cfg.train.lr:g})')}"
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
        raise DivergedError(
            f"training diverged: the train loss {train_loss:.4g} at step {step + 1} exceeds train.max_loss_factor="
            f"{cfg.train.max_loss_factor:g} x ln(vocab size {vocab}) = {ceiling:.4g} (uniform guessing scores "
            f"{math.log(vocab):.3g}); {_last_good(out, f'lower train.lr (now {cfg.train.lr:g})')}"
        )
    dead_steps = dead_steps + 1 if grad_norm == 0.0 and train_loss > 0 else 0
    if dead_steps >= _DEAD_STEPS:
        raise DivergedError(
            f"training diverged: the gradient has been exactly 0 for {dead_steps} steps (up to step {step + 1}) "
            f"with a train loss of {train_loss:.4g}: the model stopped learning, typically after a too-large "
            f"step; {_last_good(out, f'lower train.lr (now {cfg.train.lr:g})')}"
        )
    return dead_steps


def _check_anchors(cfg: ExperimentConfig, selector: Any, val_rows: int) -> None:
    """Refuse a selector that matches validation anchors when the validation split is empty."""
    if val_rows == 0 and cfg.selection.features.val_anchors and selector.requires & {"val_scores", "val_gram"}:
        raise ConfigError(
            f"selection.method={cfg.selection.method!r} needs validation anchors but the validation split is empty: "
            "set data.val_per_domain >= 1 (or give validation rows in data.split_column)"
        )


# a run shorter than this (or than eval.every) is told how to switch the final exact match off
_SHORT_RUN_STEPS = 20


def _exact_match_line(cfg: ExperimentConfig, test: Any) -> str | None:
    """The start line that states what the final exact match will decode (its cost).

    Args:
        cfg: the run's config (``eval.exact_match``, ``eval.max_new_tokens``, ``train.max_steps``).
        test: the test split, whose prompts with a reference answer are decoded.

    Returns:
        The number of prompts and their ``max_new_tokens``, with how to switch it off
        (``eval.exact_match=0``) for a run of fewer than ``eval.every`` or ``_SHORT_RUN_STEPS`` steps,
        whose generations can take longer than its training; ``None`` when nothing will be decoded.
    """
    from mixsel.evaluate import exact_match_prompts

    ev = cfg.eval
    prompts = exact_match_prompts(test, ev.exact_match) if ev.exact_match > 0 else {}
    total = sum(len(rows) for rows in prompts.values())
    if not total:
        return None
    per_domain = ", ".join(f"{name} {len(rows)}" for name, rows in prompts.items())
    line = (
        f"exact match: the final test decodes {total} prompts ({per_domain}) of up to {ev.max_new_tokens} new "
        f"tokens each (eval.exact_match={ev.exact_match} per domain, eval.max_new_tokens={ev.max_new_tokens})"
    )
    steps = cfg.train.max_steps
    if steps < max(ev.every, _SHORT_RUN_STEPS):
        line += f"; in a {steps}-step run this can take longer than training: eval.exact_match=0 switches it off"
    return line


def _reference_model(cfg: ExperimentConfig, tokenizer: Any, device: torch.device) -> torch.nn.Module | None:
    """DoReMi's frozen reference model (``reweighting.reference_model``), or ``None``."""
    if not cfg.reweighting.reference_model:
        return None
    from mixsel.config import ModelConfig
    from mixsel.model import build_model

    spec = ModelConfig(name_or_path=cfg.reweighting.reference_model, trust_remote_code=cfg.model.trust_remote_code)
    reference = build_model(spec, tokenizer, field="reweighting.reference_model").to(device)
    return reference.eval().requires_grad_(False)


def _restore(state: dict[str, Any], run: _Run) -> int:
    """Load a checkpoint's states into the run's components (exact resume); returns its step."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _restate_schedule(run.optimizer, run.scheduler, run.cfg)
    run.engine.load_state_dict(state, selector_state=_selector_state(state, run.world))
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
    clock: _Clock,
) -> None:
    """The run's plots, ``final/`` (model and tokenizer), ``generations.jsonl`` and, last, ``result.json``.

    ``result["time"]`` is measured again just before ``result.json`` is written, so that its total
    includes writing the rest. The trained state is already checkpointed when this runs.

    Raises:
        OSError: a write failed (a full disk, also when safetensors or torch say so in their own
            exception types): one line naming the folder, the bytes ``final/`` needs and those free;
            ``final/`` and temporary files are removed, and ``--resume`` writes them again.
    """
    from mixsel.model import quiet_hf_progress
    from mixsel.plots import plot_run

    final_dir = out / "final"
    free = free_bytes(out)
    # an earlier result.json (a finished run resumed again) goes first: a failure below leaves an unfinished run
    (out / "result.json").unlink(missing_ok=True)
    try:
        if cfg.train.plots:
            plot_run(out)
        shutil.rmtree(final_dir, ignore_errors=True)
        with quiet_hf_progress():
            model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        if generations:
            _write_atomic(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in generations))
        result["time"] = clock.report()
        # written last: a result.json marks a finished run
        _write_atomic(out / "result.json", json.dumps(result, indent=2))
    except Exception as err:
        needed = state_bytes(model.state_dict())
        what = write_failure(err, free, needed)
        if what is None:  # not a failed write: a bug, reported as one
            raise
        shutil.rmtree(final_dir, ignore_errors=True)
        raise OSError(
            f"could not write the final model and results ({what}; {space_note(out, needed, free, 'final/')}); the "
            f"trained state is saved in {out / CHECKPOINT_NAME} (step {cfg.train.max_steps}): free some space, "
            "then finish the run with --resume (it runs only the final evaluation and writes)"
        ) from err


@dataclass
class _Clock:
    """Wall seconds of this process's run, by part (``result.json``'s ``time``).

    A resumed run counts only the current process: the steps, loading and evaluations before the
    interruption are not included. Under torchrun each rank has its own; rank 0 writes its numbers.
    """

    # time.perf_counter() when the run began (mixsel.train.train was called)
    start: float = field(default_factory=time.perf_counter)
    # load_mixture: reading, tokenising and splitting the data
    data: float = 0.0
    # tokenizer, model (LoRA wrapping included), reference model, engine, and a resumed checkpoint's states
    model: float = 0.0
    # the step loop without its evaluations (checkpoints included)
    train: float = 0.0
    # every Run.evaluate: periodic validation, the final test (exact match generation included) and validation
    eval: float = 0.0

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Add the wall seconds of the ``with`` block to ``part`` (``"data"``, ``"model"`` or ``"eval"``)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - began)

    def report(self) -> dict[str, float]:
        """``{"data_s", "model_s", "train_s", "eval_s", "total_s"}`` rounded to 0.01 s; the total runs
        from ``start`` to now (the parts leave out preflight, the run folder and the final writes)."""
        parts = {"data_s": self.data, "model_s": self.model, "train_s": self.train, "eval_s": self.eval}
        return {k: round(v, 2) for k, v in {**parts, "total_s": time.perf_counter() - self.start}.items()}


@dataclass
class _Run:
    """What a run holds while it trains (:func:`_start` builds it)."""

    cfg: ExperimentConfig
    world: Any
    device: torch.device
    out: Path
    mixture: Any
    tokenizer: Any
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    engine: Engine
    autocast: Any
    start: int = 0
    loggers: list[Any] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    clock: _Clock = field(default_factory=_Clock)
    # the step of the latest checkpoint in the run folder, written or resumed from by this process
    saved: int | None = None

    def checkpoint(self, step: int) -> None:
        """An atomic, verified checkpoint of everything the run needs to continue exactly (a collective)."""
        engine = self.engine
        # "local" selection: every rank's selector has its own state
        selectors = (
            all_gather_object(engine.selector.selector.state_dict()) if engine.selector.mode == "local" else None
        )
        _check_finite_weights(self.model, step, self.out)
        if self.world.is_main:
            state = {
                "step": step,
                "fingerprint": self.fingerprints["resume"],
                "data_fingerprint": self.fingerprints.get("data", ""),
                "run_config": json.loads(json.dumps(run_fields(self.cfg), default=str)),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **engine.state_dict(),
                **({"selector_ranks": selectors} if selectors is not None else {}),
                "rng": rng_state(),
            }
            meta = {"fingerprint": self.fingerprints["resume"], "result_fingerprint": self.fingerprints["result"]}
            save_checkpoint(self.out, state, meta=meta)
        barrier()
        self.saved = step

    def evaluate(
        self, split: Any, prefix: str, generate: bool = False, records: list[dict[str, Any]] | None = None
    ) -> dict[str, float]:
        """Per-domain losses on ``split`` (and exact match with ``generate``)."""
        from mixsel.evaluate import domain_losses, exact_match

        ev, pad = self.cfg.eval, self.tokenizer.pad_token_id
        with self.clock.measure("eval"):
            metrics = domain_losses(
                self.model, split, pad_token_id=pad, max_per_domain=ev.max_per_domain, prefix=prefix
            )
            if generate and ev.exact_match > 0:
                metrics.update(
                    exact_match(
                        self.model,
                        self.tokenizer,
                        split,
                        limit=ev.exact_match,
                        max_new_tokens=ev.max_new_tokens,
                        batch_size=ev.generation_batch_size,
                        prefix=prefix,
                        checker=ev.answer_checker,
                        tolerance=ev.answer_tolerance,
                        records=records,
                    )
                )
        return metrics

    def record(self, step: int, plan: StepPlan, metrics: dict[str, Any]) -> None:
        """``selections.jsonl`` (with ``train.log_selections``) and the metric loggers (rank 0)."""
        if not self.world.is_main:
            return
        if self.cfg.train.log_selections:
            with open(self.out / "selections.jsonl", "a") as fh:
                fh.write(json.dumps(self.engine.selections_record(plan)) + "\n")
        if (step + 1) % self.cfg.train.log_every == 0 or "val/loss_mean" in metrics:
            for logger in self.loggers:
                logger.log(metrics, step + 1)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _load_data(cfg: ExperimentConfig, tokenizer: Any, progress: bool | None) -> tuple[Any, Any]:
    """The mixture (from the prepared store) and None; with ``data.streaming``, the held-out splits and the
    :class:`mixsel.data.streaming.StreamingSampler` of the training rows (nothing is prepared)."""
    if cfg.data.streaming:
        from mixsel.data.streaming import load_streaming

        return load_streaming(cfg.data, tokenizer, pool_size=cfg.train.pool_size, seed=cfg.seed)
    from mixsel.data.build import load_mixture

    return load_mixture(cfg.data, tokenizer, seed=cfg.seed, progress=progress), None


def _train_rows(mixture: Any, sampler: Any, pad_id: int | None) -> dict[str, Any]:
    """:func:`build_engine`'s training-row arguments: the mixture's train split, or the streaming sampler."""
    if sampler is not None:
        return {
            "train_domains": None,
            "train_batch": lambda ids: sampler.collate(ids, pad_id),
            "train_sources": sampler.source_of,
            "sampler": sampler,
        }
    split = mixture.train
    return {
        "train_domains": split.domain_ids,
        "train_batch": lambda ids: split.collate(ids, pad_id),
        "train_sources": split.source_of,
    }


def _start(cfg: ExperimentConfig, progress: bool) -> _Run:
    """Check, then load data and model, build the engine, resume, and open the run folder."""
    from tqdm.auto import tqdm

    from mixsel.logging import check_report_to, launch_message
    from mixsel.model import build_model, build_tokenizer

    clock = _Clock()  # this process's wall seconds by part (a resumed run: only its own)
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

    # ---- data, model, optimiser, engine --------------------------------------------------------
    with clock.measure("model"):
        tokenizer = build_tokenizer(cfg.model)
    with clock.measure("data"):
        # preparing a corpus shows datasets' bars (rows/s, time left) on the main process of a run with a bar
        mixture, sampler = _load_data(cfg, tokenizer, None if progress and world.is_main else False)
    say(summarize_mixture(mixture, cfg.eval), flush=True)
    _check_anchors(cfg, selector, len(mixture.validation))
    em_line = _exact_match_line(cfg, mixture.test)
    if em_line and progress:
        say(em_line, flush=True)
    elif em_line:
        log.info(em_line)
    pad_id = tokenizer.pad_token_id
    val_split = mixture.validation
    with clock.measure("model"):
        model = build_model(cfg.model, tokenizer).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        engine = build_engine(
            cfg,
            selector,
            mixture.domains,
            **_train_rows(mixture, sampler, pad_id),
            val_domains=val_split.domain_ids,
            val_batch=lambda ids: val_split.collate(ids, pad_id),
            world=world,
            reference=_reference_model(cfg, tokenizer, device),
        )
    launch = launch_message(
        "mixsel train",
        world_size=world.world_size,
        backend=torch.distributed.get_backend() if world.distributed else "none",
        mode=engine.selector.mode,
        selector=cfg.selection.method,
        batch=cfg.train.batch_size,
        pool=cfg.train.pool_size,
        rank=world.rank,
    )
    if progress:  # where the progress bar goes: seen on every rank without any logging set up
        tqdm.write(launch, file=sys.stderr)
    else:
        log.info(launch)
    run = _Run(
        cfg,
        world,
        device,
        out,
        mixture,
        tokenizer,
        model,
        params,
        optimizer,
        scheduler,
        engine,
        _autocast(cfg.train.autocast, device),
        clock=clock,
    )
    if state is not None:
        with clock.measure("model"):
            run.start = _restore(state, run)
        run.saved = run.start
    state = None  # the checkpoint's tensors are in the model and optimizer now

    # ---- the run folder: written only now that config, data and model are known to work ------
    run.loggers = _open_run_folder(out, cfg, mode, world, run.start)
    run.fingerprints = {"resume": config_fingerprint(cfg), "result": config_fingerprint(cfg, RESULT_SAFE_FIELDS)}
    run.fingerprints.update(record_run(cfg, is_main=world.is_main))  # the run marker; the data fingerprint
    return run


class StoppedBySignal(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT after finishing a step, with a checkpoint of that step saved.

    A ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it. ``mixsel train`` prints
    its message as one line and exits with ``exit_status``: 128 + the signal number, what the signal
    itself would give (143 for SIGTERM, 130 for SIGINT).

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        step: the last step trained (and saved).
        checkpoint: the checkpoint folder holding that step.
        exit_status: 143 or 130.
    """

    def __init__(self, signum: int, step: int, out: Path) -> None:
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = out / CHECKPOINT_NAME
        self.exit_status = 128 + int(signum)
        super().__init__(
            f"mixsel: stopped by {self.signal_name} after step {step}; checkpoint saved in {self.checkpoint}; "
            "resume with --resume"
        )


class _Signals:
    """SIGTERM and SIGINT while the steps run: noted, and acted on after the current step.

    Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some time before they kill. Inside the
    ``with`` block the first signal is only recorded; :meth:`stop_if_requested`, called after each
    step, then writes a checkpoint and raises :class:`StoppedBySignal`. Later signals are ignored (a
    checkpoint being saved is finished; saves are atomic anyway). Under torchrun every rank installs
    the handlers, and the ranks agree on the step to stop at through one small all-reduce per step.
    """

    _HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self._HANDLED:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _note(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if self.run.world.is_main and os.isatty(2):  # a person at a terminal: say that it was heard
            what = "finishing this step, then saving a checkpoint" if first else "already stopping"
            os.write(2, f"\nmixsel: {signal.Signals(signum).name} received: {what}\n".encode())

    def requested(self) -> int | None:
        """The signal to stop for (the same on every rank: a collective under torchrun), or None."""
        if not self.run.world.distributed:
            return self.received
        flags = torch.zeros(len(self._HANDLED), device=self.run.device)
        if self.received is not None:
            flags[self._HANDLED.index(self.received)] = 1
        all_reduce_sum(flags)
        return next((s for s, flag in zip(self._HANDLED, flags.tolist()) if flag > 0), None)

    def stop_if_requested(self, step: int) -> None:
        """After ``step``: if a signal came, checkpoint ``step`` (unless saved) and raise :class:`StoppedBySignal`."""
        signum = self.requested()
        if signum is None:
            return
        run = self.run
        if run.saved != step:
            run.checkpoint(step)
        run.close()
        log.info("stopping after step %d (%s); continue with --resume", step, signal.Signals(signum).name)
        raise StoppedBySignal(signum, step, run.out)


def _check_free_space(run: _Run) -> None:
    """Warn (on the main rank) when the run folder's disk cannot hold a checkpoint and ``final/``.

    The estimate: the model's state, the optimiser's state (AdamW: twice the trainable parameters)
    for a checkpoint, and the model's state again for ``final/``.
    """
    if not run.world.is_main:
        return
    model = state_bytes(run.model.state_dict())
    needed = model + 2 * state_bytes(run.params) + model
    free = free_bytes(run.out)
    if free < needed:
        log.warning(
            "train.output_dir=%s has %s free; a checkpoint (model and optimiser state) and final/ need about %s: "
            "the run may stop with a full disk at its first checkpoint or at the end",
            run.out,
            size_text(free),
            size_text(needed),
        )


def train(cfg: ExperimentConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one experiment; returns the content of ``result.json``.

    ``progress`` shows the progress bar and prints the start lines (run folder, data, threads, the
    data summary) on stdout.
    """
    from tqdm.auto import tqdm

    from mixsel.logging import progress_postfix
    from mixsel.runfolder import release_run_folder

    try:  # the run folder's lock is held from _start to the end of the run, not a moment longer
        run = _start(cfg, progress)
        _check_free_space(run)
        model, engine, world, out = run.model, run.engine, run.world, run.out
        vocab = 0  # the model's output size, read from the first logits (ln V = uniform guessing)
        dead_steps = 0  # steps in a row with a zero gradient and a positive loss
        t_start = time.perf_counter()
        bar = tqdm(
            range(run.start, cfg.train.max_steps),
            initial=run.start,
            total=cfg.train.max_steps,
            disable=not (progress and world.is_main),
            desc=f"train[{cfg.name if cfg.name != 'default' else cfg.selection.method}]",
        )
        with _Signals(run) as signals, bar:  # signals: finish the step, save it, stop (StoppedBySignal)
            for step in bar:
                t0 = time.perf_counter()
                lr = run.scheduler.get_last_lr()[0]
                # 1-2. the pool (drawn by the sampling weights) and its selection, the same on every rank
                plan = engine.plan(model, step=step, lr=lr)
                t1 = time.perf_counter()

                # 3. the weighted train step on this rank's share of the selection
                run.optimizer.zero_grad(set_to_none=True)
                with plan.backward_context():
                    vocab = _backward(model, engine, plan, device=run.device, autocast=run.autocast, out=out) or vocab
                grad_norm = _optimizer_step(run.params, run.optimizer, cfg, world, step=step, out=out)
                run.scheduler.step()
                t2 = time.perf_counter()

                # 4. domain statistics (summed over ranks) -> the reweighter
                report = engine.finish(model, plan)

                # 5. logging, evaluation, checkpoints
                metrics: dict[str, Any] = {
                    **report.metrics,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "time/train": t2 - t1 - report.metrics["time/capture"],
                    "time/step": time.perf_counter() - t0,
                }
                dead_steps = _check_learning(
                    metrics["train/loss"], grad_norm, vocab, dead_steps, cfg, step=step, out=out
                )
                if (step + 1) % cfg.eval.every == 0 or step + 1 == cfg.train.max_steps:
                    metrics.update(run.evaluate(run.mixture.validation, "val"))
                run.record(step, plan, metrics)
                if world.is_main:
                    bar.set_postfix(progress_postfix(metrics), refresh=False)
                if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
                    run.checkpoint(step + 1)
                if cfg.train.stop_after is not None and step + 1 >= cfg.train.stop_after:
                    # a planned interruption (e.g. a time limit): the schedule still spans max_steps
                    if run.saved != step + 1:
                        run.checkpoint(step + 1)
                    run.close()
                    log.info("stopping after step %d (train.stop_after); continue with --resume", step + 1)
                    return {"stopped_at": step + 1}
                signals.stop_if_requested(step + 1)  # SIGTERM / SIGINT: a checkpoint, then StoppedBySignal
            wall = time.perf_counter() - t_start
            run.clock.train = wall - run.clock.eval  # every evaluation so far ran inside the loop
            # the trained state is saved before the final evaluation and writes: a failure there (an answer
            # checker, a full disk) leaves a run that --resume completes (it runs only the final part)
            if run.saved != cfg.train.max_steps and cfg.train.max_steps > 0:
                run.checkpoint(cfg.train.max_steps)
            signals.stop_if_requested(cfg.train.max_steps)
        return _finish(run, wall)
    finally:
        release_run_folder(cfg.train.output_dir)


def _finish(run: _Run, wall: float) -> dict[str, Any]:
    """The final evaluation (test split with exact match, then validation), ``final/`` and ``result.json``.

    Args:
        run: the run, trained.
        wall: seconds of the step loop, its evaluations included (``wall_time_s``).
    """
    cfg, reweighter = run.cfg, run.engine.reweighting.reweighter
    generations: list[dict[str, Any]] = []  # one record per exact-match prompt -> generations.jsonl
    test = run.evaluate(run.mixture.test, "test", generate=True, records=generations)  # generation: final test only
    final_val = run.evaluate(run.mixture.validation, "val")
    result = {
        "name": cfg.name,
        "method": cfg.selection.method,
        "reweighting": cfg.reweighting.method,
        "steps": cfg.train.max_steps,
        "seed": cfg.seed,
        "wall_time_s": wall,
        "time": run.clock.report(),  # measured again as result.json is written (rank 0)
        "peak_memory_mb": _peak_memory_mb(run.device),
        "domains": run.mixture.domains,
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
    _check_finite_weights(run.model, cfg.train.max_steps, run.out)
    if run.world.is_main:
        run.close()
        _write_final(run.out, cfg, run.model, run.tokenizer, result, generations, run.clock)
    barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m mixsel.train ...``: the same as ``mixsel train ...`` (flags, errors, exit status)."""
    import sys

    from mixsel.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
