"""Overrides that make a training run take seconds: micro Llama, short sequences, small splits."""

FAST = [
    "model.config_file=embedded:micro-llama",
    "data.max_length=48",
    "data.max_train_per_domain=40",
    "data.val_per_domain=8",
    "data.test_per_domain=8",
    "train.batch_size=4",
    "train.pool_size=8",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.log_every=1",
    "eval.every=3",
    "eval.max_per_domain=4",
    "eval.exact_match=2",
    "eval.max_new_tokens=4",
    "train.plots=false",  # matplotlib figures cost ~1.5 s a run; tests/test_plots.py draws them
]
