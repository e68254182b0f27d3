"""Every check that needs no data and no model, made before a run loads or writes anything.

:func:`preflight` is what ``mixsel train`` runs first: value ranges (:func:`mixsel.config.validate`),
the selector and reweighter names, the selector's options and what each method needs, and what the
end of a run uses: the ``train.report_to`` loggers installed, every answer checker imported and called
once on a sample pair (only when ``eval.exact_match > 0``), a ``weights_from`` file readable
(:func:`check_methods`, which ``mixsel compare`` also runs for every run before the first trains), the
device, the model / tokenizer / reference paths (one line such as "not a local folder, and the hub is
offline"; a folder that needs its own code unless ``model.trust_remote_code``), the run folder
(:mod:`mixsel.runfolder`) and, on ``--resume``, the checkpoint's config fingerprint. Each failure
is one ``ValueError`` / ``KeyError`` / ``FileNotFoundError`` line naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

import torch

from mixsel.checkpoint import load_checkpoint
from mixsel.config import ExperimentConfig, validate
from mixsel.errors import ConfigError, OptionError, UnknownNameError
from mixsel.registry import available_reweighters, get_selector
from mixsel.runfolder import check_resume, plan_run_folder

__all__ = ["check_methods", "preflight"]


def _check_device(name: str) -> None:
    """Raise one clear line if ``train.device`` names a CUDA device this machine does not have."""
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"train.device={name!r} but torch finds no CUDA device (torch {torch.__version__}, {built}); "
            "use train.device=cpu or train.device=auto"
        )
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto"
        )


def _check_model_paths(cfg: ExperimentConfig) -> None:
    """One clear line for a model, tokenizer, reference or config path that cannot work, before any load."""
    from mixsel.model import check_model_source, resolve_config_file

    trust = cfg.model.trust_remote_code
    if cfg.model.name_or_path:
        check_model_source(cfg.model.name_or_path, "model.name_or_path", "model", trust_remote_code=trust)
    elif cfg.model.config_file:
        resolve_config_file(cfg.model.config_file)
    else:
        raise ConfigError("set model.name_or_path (a checkpoint) or model.config_file (a fresh model)")
    if cfg.model.tokenizer and cfg.model.tokenizer != "embedded":
        check_model_source(cfg.model.tokenizer, "model.tokenizer", "tokenizer", trust_remote_code=trust)
    elif cfg.model.name_or_path and not cfg.model.tokenizer:
        check_model_source(cfg.model.name_or_path, "model.name_or_path", "tokenizer", trust_remote_code=trust)
    if cfg.reweighting.reference_model:
        check_model_source(
            cfg.reweighting.reference_model, "reweighting.reference_model", "model", trust_remote_code=trust
        )


def _check_end_of_run(cfg: ExperimentConfig) -> None:
    """What a run would otherwise meet only at its end, or after its data and model are loaded.

    The loggers of ``train.report_to`` are installed; with ``eval.exact_match > 0`` every answer
    checker imports, is a plain function of (prediction, reference) from the user's own code (or
    mixsel's) and returns a bool on a sample pair (:func:`mixsel.answers.check_answer_checkers`;
    with ``eval.exact_match=0`` no checker is imported); a ``reweighting.options.weights_from`` file
    is a readable mixsel ``result.json``.
    """
    from mixsel.logging import check_report_to

    check_report_to(cfg.train.report_to)
    if cfg.eval.exact_match > 0:
        from mixsel.answers import check_answer_checkers

        check_answer_checkers(cfg.eval.answer_checker, tolerance=cfg.eval.answer_tolerance)
    source = cfg.reweighting.options.get("weights_from") if isinstance(cfg.reweighting.options, dict) else None
    if source is not None:
        from mixsel.reweighting.static import read_weights_from

        read_weights_from(source)


def check_methods(cfg: ExperimentConfig) -> Any:
    """Check the selector and reweighter names and what they need, and what the end of the run uses
    (loggers, answer checkers, a ``weights_from`` file: :func:`_check_end_of_run`); return the built selector.

    Building the selector checks its options. A reweighter's options are checked when it is built,
    once the data has named the domains.

    Raises:
        KeyError: an unknown method name (the valid ones are listed).
        ValueError: bad selector options, no validation anchors for a selector that scores against
            them, no reference model for a reweighter that needs one, a logger that is not installed,
            an answer checker that cannot work, an unreadable ``weights_from`` file.
    """
    from mixsel.registry import _REWEIGHTERS

    try:
        selector = get_selector(cfg.selection.method, **cfg.selection.options)
    except OptionError as err:  # an unknown or missing keyword option
        raise ConfigError(
            f"selection.options for {cfg.selection.method!r}: {err}; docs/methods.md lists the options"
        ) from None
    if cfg.data.streaming and getattr(selector, "needs_source_sizes", False):
        raise ConfigError(
            f"selection.method={cfg.selection.method!r} decides its small sources from every domain's number of "
            "training rows, which a stream (data.streaming=true) does not know up front; set "
            "selection.options.small_from=pool or selection.options.small_sources=[...], or data.streaming=false"
        )
    names = available_reweighters()
    if cfg.reweighting.method not in names:
        raise UnknownNameError(
            f"unknown reweighter {cfg.reweighting.method!r}; valid names: {', '.join(names)}. "
            "Set reweighting.method to one of them."
        )
    needs_val = sorted(set(selector.requires) & {"val_scores", "val_gram"})
    if needs_val and cfg.selection.features.val_anchors == 0:
        raise ConfigError(
            f"selection.method={cfg.selection.method!r} scores candidates against validation anchors ({needs_val}) "
            "but selection.features.val_anchors=0: set selection.features.val_anchors >= 1"
        )
    if getattr(_REWEIGHTERS[cfg.reweighting.method], "needs_reference", False) and not cfg.reweighting.reference_model:
        raise ConfigError(
            f"reweighting.method={cfg.reweighting.method!r} needs a reference model: train one on the natural "
            "mixture (mixsel train selection.method=random) and set reweighting.reference_model=<run>/final"
        )
    _check_end_of_run(cfg)
    return selector


def preflight(cfg: ExperimentConfig) -> tuple[Any, str, dict[str, Any] | None]:
    """Every check that needs no data and no model, before anything is loaded or written.

    Checks the value ranges, the selector and reweighter names (and builds the selector, which checks
    its options), their needs (validation anchors, a reference model), the device, the model paths
    and the run folder; on ``--resume`` loads the checkpoint and checks its config fingerprint.

    Returns:
        ``(selector, mode, state)``: the built selector; ``"fresh"``, ``"overwrite"`` or ``"resume"``;
        the checkpoint state when resuming, else ``None``.
    """
    validate(cfg)
    selector = check_methods(cfg)
    _check_device(cfg.train.device)
    _check_model_paths(cfg)
    mode = plan_run_folder(cfg)
    state = None
    if mode == "resume":
        state = load_checkpoint(cfg.train.output_dir)
        if state is None:  # pragma: no cover - plan_run_folder found a checkpoint folder
            raise ConfigError(f"--resume: no checkpoint in {cfg.train.output_dir!r}")
        check_resume(state, cfg)
    return selector, mode, state
