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
   ``<output_dir>/metrics.jsonl``; checkpoints are atomic and ``train.resume=true`` continues exactly.

The run folder gets ``config.yaml``, ``metrics.jsonl``, ``result.json`` and ``final/`` (the model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from mixsel import bookkeeping
from mixsel.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mixsel.config import ExperimentConfig, config_to_dict, load_config, save_config, validate
from mixsel.distributed import all_gather_object, all_reduce_sum, barrier, init_world
from mixsel.registry import get_reweighter, get_selector
from mixsel.step import OnlineSelector

__all__ = ["main", "train"]

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


def train(cfg: ExperimentConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one experiment; returns the content of ``result.json``."""
    from tqdm.auto import tqdm

    from mixsel.data.build import load_mixture
    from mixsel.data.sampler import CandidateSampler
    from mixsel.evaluate import domain_losses, exact_match
    from mixsel.features.loss import target_mask, token_losses
    from mixsel.logging import build_loggers, truncate_jsonl
    from mixsel.model import build_model, build_tokenizer

    # ---- set-up: world, seeds, output folder -------------------------------------------------
    validate(cfg)  # value ranges, also for configs built in Python rather than loaded
    world = init_world(cfg.train.device)
    device = _device(cfg.train.device, world.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.train.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- data and model ----------------------------------------------------------------------
    tokenizer = build_tokenizer(cfg.model)
    mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
    domains, train_split = mixture.domains, mixture.train
    num_domains = len(domains)
    pad_id = tokenizer.pad_token_id
    model = build_model(cfg.model, tokenizer).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    # ---- selection and reweighting -----------------------------------------------------------
    k, pool_size = cfg.train.batch_size, cfg.train.pool_size  # validate(cfg) checked k <= pool_size
    selector = get_selector(cfg.selection.method, **cfg.selection.options)
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
    rw_options = _weights_from(dict(cfg.reweighting.options), domains)
    # reweighting.amortize: the loop computes the statistics and updates the reweighter every update_every steps
    update_every = cfg.reweighting.update_every
    amortize = cfg.reweighting.amortize and update_every > 1
    reweighter = get_reweighter(
        cfg.reweighting.method, domains=domains, update_every=1 if amortize else update_every, **rw_options
    )
    reference = None
    if cfg.reweighting.reference_model:
        from mixsel.config import ModelConfig

        reference = build_model(ModelConfig(name_or_path=cfg.reweighting.reference_model), tokenizer).to(device)
        reference.eval().requires_grad_(False)
    elif reweighter.needs_reference:
        raise ValueError(
            f"reweighting.method={cfg.reweighting.method!r} needs a reference model: train one on the natural "
            "mixture (mixsel train selection.method=random) and set reweighting.reference_model=<run>/final"
        )
    sampler = CandidateSampler(train_split.domain_ids, pool_size, seed=cfg.seed, num_domains=num_domains)
    autocast = _autocast(cfg.train.autocast, device)

    # ---- resume ------------------------------------------------------------------------------
    start = 0
    state = load_checkpoint(out) if cfg.train.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        selector.load_state_dict(_selector_state(state, world))
        reweighter.load_state_dict(state["reweighter"])
        set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed from step %d", start)
    # metrics.jsonl keeps the lines up to the resumed step (all of them are dropped on a fresh start)
    loggers = build_loggers(out, [], truncate_from=start + 1 if start else 0) if world.is_main else []
    if world.is_main and cfg.train.log_selections:  # the same for the selections log
        truncate_jsonl(out / "selections.jsonl", start + 1 if start else 0)

    def log_metrics(metrics: dict[str, Any], step: int) -> None:
        for logger in loggers:
            logger.log(metrics, step)

    def checkpoint(step: int) -> None:
        # "local" selection: every rank's selector has its own state (a collective, on all ranks)
        selectors = all_gather_object(selector.state_dict()) if online.mode == "local" else None
        if world.is_main:
            save_checkpoint(
                out,
                {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sampler": sampler.state_dict(),
                    "selector": selector.state_dict(),
                    **({"selector_ranks": selectors} if selectors is not None else {}),
                    "reweighter": reweighter.state_dict(),
                    "rng": rng_state(),
                },
            )
        barrier()

    def evaluate(split: Any, prefix: str, generate: bool = False) -> dict[str, float]:
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
                    prefix=prefix,
                )
            )
        return metrics

    # ---- the loop ----------------------------------------------------------------------------
    val_split = mixture.validation
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
        losses = []
        mb = cfg.train.micro_batch_size
        stats_step = bookkeeping.is_stats_step(step, update_every, amortize)
        fc, rc = cfg.selection.features, cfg.reweighting
        grad_kw = {"source": fc.source, "modules": fc.modules, "projection_dim": rc.projection_dim, "seed": cfg.seed}
        capture = None  # DoGraph's domain gradients of the trained rows, from this very backward
        if reweighter.needs_grad and stats_step and rc.grad_rows == "trained":
            capture = bookkeeping.gradient_capture(model, **grad_kw)
        with capture if capture is not None else contextlib.nullcontext():
            for s in range(0, len(chosen), mb):
                rows = chosen[s : s + mb]
                batch = {key: pool[key][rows].to(device) for key in ("input_ids", "attention_mask", "labels")}
                with autocast:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                tok = token_losses(logits.float(), batch["labels"])  # per token, for DoReMi's per-token excess
                per_ex = tok.sum(1) / target_mask(batch["labels"]).sum(1).clamp_min(1)
                if not torch.isfinite(per_ex).all():
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (domains {chosen_domains[s : s + mb].tolist()}); "
                        "lower train.lr or check the data; resume from the last checkpoint with train.resume=true"
                    )
                if capture is not None:
                    capture.watch(per_ex)
                (per_ex * w[s : s + mb].to(device)).sum().div(total_w.to(device)).mul(world.world_size).backward()
                losses.append(tok.detach().cpu())
        if world.distributed:
            for p in params:  # a rank with no selected example still joins the all-reduce, with zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce_sum(p.grad).div_(world.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip) if cfg.train.grad_clip else None
        optimizer.step()
        scheduler.step()
        t2 = time.perf_counter()

        # 4. domain statistics (summed over ranks) -> reweighter
        trained = {key: pool[key][chosen] for key in ("input_ids", "attention_mask", "labels")}
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
            val_rows = bookkeeping.balanced_rows(val_split.domain_ids, num_domains, rc.val_per_domain)
            val_batch = None
            if bookkeeping.is_update_step(step, update_every) or amortize:
                val_batch = val_split.collate(val_rows, pad_id)
            if capture is not None:  # the trained rows, captured in the backward above
                stats.grad = bookkeeping.captured_domain_gradients(
                    capture, trained, chosen_domains, num_domains, model=model, **grad_kw
                )
                if val_batch is not None:
                    stats.val_grad = bookkeeping.validation_gradient(model, val_batch, **grad_kw)
            else:  # reweighting.grad_rows=pool: this rank's share of the pool, in a separate pass
                rows = torch.arange(pool["input_ids"].shape[0])[world.rank :: world.world_size]
                stats.grad, stats.val_grad = bookkeeping.domain_gradients(
                    model,
                    {key: pool[key][rows] for key in ("input_ids", "attention_mask", "labels")},
                    pool["domain_ids"][rows],
                    num_domains,
                    val_batch=val_batch,
                    **grad_kw,
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
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
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
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            checkpoint(step + 1)
        if cfg.train.stop_after is not None and step + 1 >= cfg.train.stop_after:
            # a planned interruption (e.g. a time limit): the schedule still spans max_steps
            checkpoint(step + 1)
            for logger in loggers:
                logger.close()
            log.info("stopping after step %d (train.stop_after); resume with train.resume=true", step + 1)
            return {"stopped_at": step + 1}

    # ---- final evaluation on the test split and result.json ----------------------------------
    wall = time.perf_counter() - t_start
    test = evaluate(mixture.test, "test", generate=True)  # exact match by generation: final test only
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
    if world.is_main:
        for logger in loggers:
            logger.close()
        (out / "result.json").write_text(json.dumps(result, indent=2))
        final_dir = out / "final"
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    if cfg.train.save_every:  # on every rank: checkpoint() is a collective
        checkpoint(cfg.train.max_steps)
    barrier()
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="mixsel training loop")
    parser.add_argument("--config", default=None, help="YAML experiment (default: the embedded default)")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MIXSEL_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
