"""Online minibatch selection with the Hugging Face ``Trainer`` on mixsel's embedded corpus.

Each step draws a pool of ``pool_factor x batch_size`` examples, a mixsel selector picks
``batch_size`` of them (once per pool), and the model trains on the weighted per-example loss of the
selection. Domain weights from a reweighter (``static``, ``doremi``...) are logged as
``weights/<domain>`` and checkpointed with the Trainer.

Launch::

    python examples/hf_trainer.py                                  # partitionsel, tiny Llama, CPU
    python examples/hf_trainer.py --selector stratified --lora --max-steps 20
    python examples/hf_trainer.py --reweighter static --reweighter-options '{"weights": [1,1,1,2,1,2,1]}'
    python examples/hf_trainer.py --report-to tensorboard          # then: tensorboard --logdir runs/hf
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/hf_trainer.py   # multi-GPU
    python examples/hf_trainer.py --max-steps 40 --output-dir runs/hf && \\
        python examples/hf_trainer.py --max-steps 60 --output-dir runs/hf --resume       # continue

The run folder gets the Trainer's ``checkpoint-*`` folders, ``trainer_state.json`` (its
``log_history`` holds the selection metrics) and ``final/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch


def build_split(split: str, tokenizer, domains: list[str], max_length: int, limit: int | None):
    """A ``datasets.Dataset`` with input_ids, labels (prompt tokens = -100) and the domain name."""
    import datasets

    from mixsel.data.embedded import load_embedded_records
    from mixsel.data.tokenize import tokenize_records

    records = load_embedded_records(split)
    if limit is not None:  # the first `limit` examples of each domain
        seen: dict[str, int] = {}
        kept = []
        for r in records:
            seen[r["domain"]] = seen.get(r["domain"], 0) + 1
            if seen[r["domain"]] <= limit:
                kept.append(r)
        records = kept
    toks = tokenize_records(records, tokenizer, domains=domains, max_length=max_length)
    return datasets.Dataset.from_dict(
        {
            "input_ids": [x.tolist() for x in toks.input_ids],
            "labels": [y.tolist() for y in toks.labels],
            "domain": [domains[int(d)] for d in toks.domain_ids],
        }
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--selector", default="partitionsel")
    parser.add_argument("--selector-options", default="{}", help="JSON dict of selector options")
    parser.add_argument("--reweighter", default=None, help="uniform, static, ... (default: none)")
    parser.add_argument("--reweighter-options", default="{}", help="JSON dict of reweighter options")
    parser.add_argument("--pool-factor", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train-per-domain", type=int, default=200)
    parser.add_argument("--model-config", default="embedded:micro-llama", help="embedded:NAME or a JSON file")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    parser.add_argument("--output-dir", default="runs/hf")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the launch line

    from mixsel.config import ModelConfig, ModelLoraConfig
    from mixsel.data.embedded import EMBEDDED_DOMAINS, load_embedded_tokenizer
    from mixsel.integrations.hf import SelectionTrainer, SelectionTrainingArguments
    from mixsel.model import build_model

    torch.manual_seed(args.seed)
    tokenizer = load_embedded_tokenizer()
    domains = list(EMBEDDED_DOMAINS)
    train = build_split("train", tokenizer, domains, args.max_length, args.max_train_per_domain)
    val = build_split("validation", tokenizer, domains, args.max_length, 8)
    model = build_model(
        ModelConfig(config_file=args.model_config, attn_implementation="sdpa", lora=ModelLoraConfig(enabled=args.lora)),
        tokenizer,
    )

    config = SelectionTrainingArguments(
        output_dir=args.output_dir,
        selector=args.selector,
        selector_options=json.loads(args.selector_options),
        reweighter=args.reweighter,
        reweighter_options=json.loads(args.reweighter_options),
        pool_factor=args.pool_factor,
        domains=domains,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=max(args.max_steps // 2, 1),
        save_strategy="steps",
        save_steps=max(args.max_steps // 2, 1),
        report_to=[] if args.report_to == "none" else [args.report_to],
        seed=args.seed,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = SelectionTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=val, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/final")
    print(json.dumps({"eval_loss": metrics["eval_loss"], "eval_ppl": math.exp(metrics["eval_loss"])}))
    return metrics


if __name__ == "__main__":
    main()
