"""Online minibatch selection with TRL's ``SFTTrainer`` on mixsel's embedded corpus, as chat data.

The seven domains of the embedded corpus become conversational prompt/completion pairs (the
arithmetic and chemistry questions with their worked answers; the text domains as "write a passage"
requests), TRL applies the tokenizer's chat template and trains on the completions only, and a mixsel
selector picks each step's batch from a pool of ``pool_factor x batch_size`` candidates. TRL's
metrics (``mean_token_accuracy``, ``entropy``, ``num_tokens``) are logged next to mixsel's
(``time/select``, ``select/frac/<domain>``, ``weights/<domain>``).

Launch::

    pip install "mixsel[trl]"
    python examples/trl_sft.py                                     # partitionsel, tiny Llama, CPU
    python examples/trl_sft.py --selector colm --padding-free --max-steps 20
    python examples/trl_sft.py --reweighter doge --report-to tensorboard
    python examples/trl_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --lora   # a hub model (online)
    accelerate launch --config_file configs/accelerate/cpu2.yaml examples/trl_sft.py --max-steps 3
    torchrun --nproc_per_node=2 examples/trl_sft.py --max-steps 3

The run folder gets TRL's ``checkpoint-*`` folders, ``trainer_state.json`` (its ``log_history``
holds both sets of metrics) and ``final/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch

# a minimal chat template for the embedded tokenizer (hub chat models bring their own)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_split(split: str, limit: int | None, max_chars: int = 300):
    """A ``datasets.Dataset`` with conversational ``prompt`` / ``completion`` and the ``domain`` name.

    Completions are cut to ``max_chars`` characters, so rows stay short in padding-free mode too (TRL
    truncates to ``max_length`` only with padding).
    """
    import datasets

    from mixsel.data.embedded import load_embedded_records

    seen: dict[str, int] = {}
    rows = []
    for r in load_embedded_records(split):
        seen[r["domain"]] = seen.get(r["domain"], 0) + 1
        if limit is not None and seen[r["domain"]] > limit:
            continue
        if "prompt" in r:
            question, answer = r["prompt"], r["response"]
        else:
            question, answer = f"Write a passage of {r['domain'].replace('_', ' ')}.", r["text"]
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer[:max_chars]}],
                "domain": r["domain"],
            }
        )
    return datasets.Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub id or local folder (default: a fresh tiny Llama)")
    parser.add_argument("--selector", default="partitionsel")
    parser.add_argument("--selector-options", default="{}", help="JSON dict of selector options")
    parser.add_argument("--reweighter", default=None, help="uniform, static, doremi, dograph, doge (default: none)")
    parser.add_argument("--reweighter-options", default="{}", help="JSON dict of reweighter options")
    parser.add_argument("--pool-factor", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-train-per-domain", type=int, default=200)
    parser.add_argument("--padding-free", action="store_true", help="flatten the selected rows (no padding)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    parser.add_argument("--output-dir", default="runs/trl_sft")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mixsel.config import ModelConfig
    from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer

    torch.manual_seed(args.seed)
    if args.model is None:
        from mixsel.data.embedded import load_embedded_tokenizer
        from mixsel.model import build_model

        tokenizer = load_embedded_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        model = build_model(ModelConfig(config_file="embedded:micro-llama", attn_implementation="sdpa"), tokenizer)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    cuda = torch.cuda.is_available()
    config = SelectionSFTConfig(
        output_dir=args.output_dir,
        selector=args.selector,
        selector_options=json.loads(args.selector_options),
        reweighter=args.reweighter,
        reweighter_options=json.loads(args.reweighter_options),
        pool_factor=args.pool_factor,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        max_length=None if args.padding_free else args.max_length,
        padding_free=args.padding_free,
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=max(args.max_steps // 2, 1),
        save_strategy="steps",
        save_steps=max(args.max_steps // 2, 1),
        report_to=[] if args.report_to == "none" else [args.report_to],
        seed=args.seed,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=False,
        use_cpu=not cuda,  # without it, processes started by a launcher on CPU would each train alone
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )
    trainer = SelectionSFTTrainer(
        model=model,
        args=config,
        train_dataset=chat_split("train", args.max_train_per_domain),
        eval_dataset=chat_split("validation", 8),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/final")
    summary = {"eval_loss": metrics["eval_loss"], "eval_ppl": math.exp(min(metrics["eval_loss"], 50.0))}
    summary["eval_mean_token_accuracy"] = metrics.get("eval_mean_token_accuracy")
    print(json.dumps(summary))
    return metrics


if __name__ == "__main__":
    main()
