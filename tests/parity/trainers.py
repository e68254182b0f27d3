"""The golden cases of ``golden.py`` run by the Hugging Face ``SelectionTrainer`` (same data, model, optimiser).

The data are ``mixsel train``'s own tokenised splits (:func:`mixsel.integrations.hf_utils.mixture_datasets`),
the model is built the same way from the same seed, and the optimiser and schedule are mixsel's (passed
to the Trainer as ``optimizers``); every ``selection.*`` / ``reweighting.*`` override of a case reaches the
trainer through ``SelectionTrainingArguments.mixsel``, the same config code ``mixsel train`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from _fast import FAST
from golden import CASES, COMMON, step_records


def hf_case(
    name: str,
    folder: Path,
    reference: Path | None,
    *,
    trl: bool = False,
    world_size: int = 1,
    distributed_selection: str = "global",
) -> list[dict]:
    """Run case ``name`` with :class:`SelectionTrainer` (``trl=True``: :class:`SelectionSFTTrainer` with
    ``loss_normalization="example"``, mixsel train's loss); the per-step records of :func:`golden.run_case`.

    Under a launcher with ``world_size`` ranks, each rank trains ``batch_size / world_size`` rows per step
    (the same global batch), in micro-batches of at most ``micro_batch_size``; only rank 0 returns records.
    ``distributed_selection="gather"`` computes the features of each rank's shard and all-gathers them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mixsel.config import load_config
    from mixsel.data.build import load_mixture
    from mixsel.integrations.hf import SelectionTrainer, SelectionTrainingArguments
    from mixsel.integrations.hf_utils import mixture_datasets
    from mixsel.model import build_model, build_tokenizer
    from mixsel.train import _lr_lambda, _seed_everything

    out = folder / (name.replace("/", "_") + ("" if distributed_selection == "global" else f"_{distributed_selection}"))
    overrides = [o.replace("{reference}", str(reference)) for o in CASES[name]]
    cfg = load_config(None, [*FAST, *COMMON, *overrides, f"train.output_dir={out}"])
    # the order of mixsel train: seed, tokenizer, data, model
    _seed_everything(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    mixture = load_mixture(cfg.data, tokenizer, seed=cfg.seed)
    model = build_model(cfg.model, tokenizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    t = cfg.train
    share = t.batch_size // world_size
    per_device = min(t.micro_batch_size, share)
    if trl:
        from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer

        arguments, trainer_cls = SelectionSFTConfig, SelectionSFTTrainer
        extra_args = {"loss_normalization": "example", "gradient_checkpointing": False, "bf16": False}
    else:
        arguments, trainer_cls, extra_args = SelectionTrainingArguments, SelectionTrainer, {}
    args = arguments(
        output_dir=str(out),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=share // per_device,
        pool_factor=t.pool_size // t.batch_size,
        max_steps=t.max_steps,
        max_grad_norm=t.grad_clip,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        domains=mixture.domains,
        log_selections=True,
        distributed_selection=distributed_selection,
        mixsel=[o for o in overrides if o.startswith(("selection.", "reweighting."))],
        **extra_args,
        **({"ddp_find_unused_parameters": False} if world_size > 1 else {}),
    )
    data = mixture_datasets(mixture)
    ref = None
    if cfg.reweighting.reference_model:
        ref = AutoModelForCausalLM.from_pretrained(cfg.reweighting.reference_model).eval().requires_grad_(False)
    trainer = trainer_cls(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        reference_model=ref,
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    if not trainer.is_world_process_zero():
        return []
    picks = [json.loads(line) for line in (out / "selections.jsonl").read_text().splitlines()]
    logs = [h for h in trainer.state.log_history if "loss" in h and "train/loss" in h]
    return step_records(picks, logs, grad_norm="grad_norm")
