"""Run by tests/integrations/test_launch.py under ``accelerate launch --config_file configs/accelerate/cpu2.yaml``.

Each rank trains three tiny runs (SelectionTrainer, SelectionSFTTrainer when TRL is installed, and
``mixsel train``) for 2 steps and writes ``<out>/rank<r>.json``: the world size each loop saw, the
launch lines mixsel logged on this rank and the domain composition logged by the Trainer; then
SelectionTrainer runs golden cases of ``tests/parity`` on the 2 ranks (rank 0 reports its records).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, _fast

from _fast import FAST
from conftest import make_tiny_llama


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


#: golden cases (tests/parity/golden.py) the 2-rank SelectionTrainer reproduces (no reference model needed)
PARITY_CASES = ["partitionsel/uniform", "random/dograph", "random/static"]
GATHER_CASES = ["big_loss/uniform", "hidden_fl/dograph"]


def main(out: Path) -> None:
    import datasets

    from mixsel.config import load_config
    from mixsel.integrations.hf import SelectionTrainer, SelectionTrainingArguments
    from mixsel.train import train

    lines = Lines()
    root = logging.getLogger("mixsel")
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    common = dict(
        per_device_train_batch_size=4,
        pool_factor=2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(1, 90, (32, 8), generator=g).tolist(), "domain": ["a", "b"] * 16}
    hf = SelectionTrainer(
        model=make_tiny_llama(),
        args=SelectionTrainingArguments(output_dir=str(out / "hf"), selector="stratified", **common),
        train_dataset=datasets.Dataset.from_dict({**rows, "labels": rows["input_ids"]}),
    )
    hf.train()
    report = {"rank": hf.args.process_index, "hf_world_size": hf.args.world_size}
    report["hf_frac"] = [h["select/frac/a"] for h in hf.state.log_history if "select/frac/a" in h]

    try:
        from mixsel.data.embedded import load_embedded_tokenizer
        from mixsel.integrations.trl import SelectionSFTConfig, SelectionSFTTrainer
    except ImportError:
        SelectionSFTTrainer = None
    if SelectionSFTTrainer is not None:
        tok = load_embedded_tokenizer()
        text = datasets.Dataset.from_dict(
            {"text": [f"example {i} of {i % 2}" for i in range(32)], "domain": rows["domain"]}
        )
        sft = SelectionSFTTrainer(
            model=make_tiny_llama(vocab_size=len(tok)),
            args=SelectionSFTConfig(
                output_dir=str(out / "sft"), selector="big_loss", bf16=False, gradient_checkpointing=False, **common
            ),
            train_dataset=text,
            processing_class=tok,
        )
        sft.train()
        report["sft_world_size"] = sft.args.world_size

    result = train(
        load_config(None, [*FAST, "train.max_steps=2", "eval.exact_match=0", f"train.output_dir={out / 'train'}"]),
        progress=False,
    )
    report["train_steps"] = result["steps"]
    report["world_size"] = torch.distributed.get_world_size()
    report["launch_lines"] = [line for line in lines.lines if "world size" in line]

    # the golden cases of tests/parity on 2 ranks: the same global batch, half of it per rank
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
    from trainers import hf_case

    report["parity"] = {name: hf_case(name, out / "parity", None, world_size=2) for name in PARITY_CASES}
    # gather: each rank computes its shard's features; the selection (and so the training) is the same
    report["parity_gather"] = {
        name: hf_case(name, out / "parity", None, world_size=2, distributed_selection="gather") for name in GATHER_CASES
    }
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
