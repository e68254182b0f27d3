"""CoLM's zeroth-order gradient features, Adam normalisation and per-source top-h masks.

CoLM (Nguyen et al., ICLR 2025, arXiv 2407.19580) selects medoids of the big sources from

* Eq. 5-6: an SPSA estimate of each example's gradient w.r.t. the last V-projection matrix (its LoRA
  ``B`` under peft), ``g_i ~ c_i z`` with ``c_i = (L_i(W + eps z) - L_i(W - eps z)) / (2 eps)``;
* Eq. 3-4: Adam-normalised features ``m_i / (eps + sqrt(v_i))`` from historical moments of the big
  sources;
* Eq. 8: per-source masks keeping the ``h`` coordinates of largest normalised-mean magnitude, and L1
  distances between the masked features.

Cost (Eq. 6's trick): the activations entering the decoder block that holds the perturbed matrix are
computed ONCE (no grad; the rest of that forward is skipped), then only that block, the blocks after it
(none for the last V-projection), the final norm and the LM head run twice per direction; the head only
at the target positions, a few thousand tokens at a time (:func:`mixsel.features.lm_head.target_losses`),
never the ``[n, T, V]`` logits.

Storage design: :func:`spsa_features` returns an :class:`SPSAEstimate` holding only the ``[n, k]``
coefficients ``c_ik`` and the seed; the directions ``z_k`` (Gaussian, as in Eq. 5) are regenerated from
``(seed, k)`` on the CPU when needed (MeZO's trick), so ranks can exchange ``n x k`` numbers instead of
``n x d`` and still agree on the dense features ``(1/k) sum_k c_ik z_k`` (``.features()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixsel.errors import ConfigError
from mixsel.features.grads import find_last_module
from mixsel.features.lm_head import target_losses
from mixsel.features.loss import model_inputs, output_embeddings
from mixsel.seeding import direction_seed

__all__ = [
    "AdamNormalizer",
    "SPSAEstimate",
    "spsa_direction",
    "spsa_features",
    "topk_source_mask",
]


def spsa_direction(
    seed: int, k: int, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device: Any = None
) -> torch.Tensor:
    """The ``k``-th perturbation ``z_k ~ N(0, I)`` of ``shape``, from a CPU generator seeded by (seed, k)."""
    g = torch.Generator().manual_seed(direction_seed(seed, k))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@dataclass
class SPSAEstimate:
    """Per-example SPSA coefficients plus what regenerates the directions.

    Attributes:
        coefficients: Tensor[n, k], ``c_ik = (L_i(W + eps z_k) - L_i(W - eps z_k)) / (2 eps)``
            (``~ <z_k, grad_i>`` as eps -> 0).
        seed: directions are ``spsa_direction(seed, k, shape)``.
        shape: shape of the perturbed weight.
        eps: perturbation scale.
        module: name of the perturbed module.
        hidden_size: the model's hidden size (CoLM's default ``h`` for :func:`topk_source_mask`).
    """

    coefficients: torch.Tensor
    seed: int
    shape: tuple[int, ...]
    eps: float
    module: str
    hidden_size: int | None = None

    @property
    def num_directions(self) -> int:
        return int(self.coefficients.shape[1])

    @property
    def dim(self) -> int:
        return int(torch.Size(self.shape).numel())

    def directions(self) -> torch.Tensor:
        """Tensor[k, d]: the regenerated flattened directions."""
        c = self.coefficients
        return torch.stack(
            [
                spsa_direction(self.seed, k, self.shape, dtype=c.dtype, device=c.device).flatten()
                for k in range(self.num_directions)
            ]
        )

    def features(self) -> torch.Tensor:
        """Tensor[n, d]: ``(1/k) sum_k c_ik z_k`` (Eq. 6, averaged over the k directions)."""
        return self.coefficients @ self.directions() / self.num_directions


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward once the block input is captured."""


def _decoder_blocks(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, torch.nn.ModuleList, int]:
    """(decoder backbone, its layer list, index of the layer containing module ``name``)."""
    best = None
    for list_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.startswith(list_name + "."):
            rest = name[len(list_name) + 1 :].split(".", 1)[0]
            if rest.isdigit() and (best is None or len(list_name) > len(best[0])):
                best = (list_name, mod, int(rest))
    if best is None:
        raise ValueError(f"module {name!r} is not inside a decoder layer list (nn.ModuleList of blocks)")
    list_name, layers, index = best
    parent = model.get_submodule(list_name.rsplit(".", 1)[0]) if "." in list_name else model
    return parent, layers, index


def _final_norm(backbone: torch.nn.Module) -> torch.nn.Module:
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(backbone, attr, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ValueError(
        f"cannot find the final norm of {type(backbone).__name__} (looked for norm, final_layernorm, ln_f); "
        "spsa_features supports Llama/Mistral/Qwen/Phi-style decoders"
    )


def spsa_features(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    module: str | None = None,
    eps: float = 1e-3,
    seed: int = 0,
    num_directions: int = 1,
) -> SPSAEstimate:
    """CoLM Eq. 6: SPSA estimates of the per-example gradients w.r.t. one weight matrix.

    Args:
        model: a Hugging Face decoder-only causal LM (peft-wrapped is fine), dropout off.
        batch: dict(input_ids, attention_mask, labels), -100 = ignored.
        module: name of the ``nn.Linear`` to perturb; default ``find_last_module(model, "v_proj")``
            (LoRA ``B`` of the last V-projection under peft, else its weight).
        eps: perturbation scale (CoLM: 1e-3).
        seed: seed of the directions (a fresh one per step gives CoLM's "smooth" estimate; a fixed one
            reproduces the reference code's fixed z).
        num_directions: k directions averaged (CoLM: 1).

    Returns:
        An :class:`SPSAEstimate`; ``.features()`` gives the dense [n, d] features.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    name = module or find_last_module(model, "v_proj")
    target = model.get_submodule(name)
    weight = getattr(target, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} has no weight to perturb")
    backbone, layers, index = _decoder_blocks(model, name)
    norm, head = _final_norm(backbone), output_embeddings(model)
    captured: dict[str, Any] = {}

    def pre_hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = layers[index].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**model_inputs(batch, model))
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError(f"decoder layer {index} was not called in the forward")
    args, kwargs = captured["args"], captured["kwargs"]
    hidden_key = "hidden_states" if not args else None
    labels = batch["labels"].to(weight.device)

    def tail_loss() -> torch.Tensor:
        h = kwargs[hidden_key] if hidden_key else args[0]
        for j in range(index, len(layers)):
            call_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            out = layers[j](h, *args[1:], **call_kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return target_losses(head, norm(h), labels)  # the head at target positions only, in token chunks

    original = weight.detach().clone()
    coeffs = []
    try:
        with torch.no_grad():
            for k in range(num_directions):
                z = spsa_direction(seed, k, tuple(weight.shape), dtype=weight.dtype, device=weight.device)
                weight.copy_(original + eps * z)
                plus = tail_loss()
                weight.copy_(original - eps * z)
                minus = tail_loss()
                coeffs.append((plus - minus) / (2 * eps))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    config = getattr(model, "config", None)
    return SPSAEstimate(
        coefficients=torch.stack(coeffs, dim=1),
        seed=seed,
        shape=tuple(weight.shape),
        eps=eps,
        module=name,
        hidden_size=getattr(config, "hidden_size", None),
    )


class AdamNormalizer:
    """CoLM Eq. 3-4: Adam-normalised per-example features ``m_i / (eps + sqrt(v_i))``.

    For a feature ``g_i`` at step ``t`` (= number of :meth:`update` calls so far + 1)::

        m_i = (beta1 * m + (1 - beta1) * g_i) / (1 - beta1^t)
        v_i = (beta2 * v + (1 - beta2) * g_i^2) / (1 - beta2^t)

    where ``m``, ``v`` are the historical (uncorrected) moments. :meth:`update` folds in the features
    of the examples that should shape the history - CoLM keeps it for the big sources only and uses the
    selected examples: ``m <- beta1 m + (1 - beta1) mean_i g_i``, ``v <- beta2 v + (1 - beta2) mean_i
    g_i^2`` (the mean of the per-example uncorrected moments). The state is checkpointed with
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        for nm, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{nm} must be in [0, 1), got {b}")
        if eps < 0:
            raise ConfigError(f"eps must be non-negative, got {eps}")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.step = 0

    def _moments(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.m is None or self.v is None:
            z = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
            return z, z
        if self.m.shape[-1] != like.shape[-1]:
            raise ValueError(
                f"features have dimension {like.shape[-1]} but the normaliser's history has "
                f"{self.m.shape[-1]}; use one AdamNormalizer per feature space"
            )
        return self.m.to(like), self.v.to(like)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Tensor[n, d]: Adam-normalised features at the current step (history not changed)."""
        m, v = self._moments(features)
        t = self.step + 1
        m_i = (self.beta1 * m + (1 - self.beta1) * features) / (1 - self.beta1**t)
        v_i = (self.beta2 * v + (1 - self.beta2) * features.square()) / (1 - self.beta2**t)
        return m_i / (self.eps + v_i.sqrt())

    def update(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold ``features`` (rows where ``mask``; e.g. the selected big-source examples) into the history.

        No rows: nothing changes (the step does not advance).
        """
        rows = features if mask is None else features[mask]
        if rows.shape[0] == 0:
            return
        m, v = self._moments(rows)
        self.m = (self.beta1 * m + (1 - self.beta1) * rows.mean(0)).detach()
        self.v = (self.beta2 * v + (1 - self.beta2) * rows.square().mean(0)).detach()
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "step": self.step,
            "m": None if self.m is None else self.m.detach().cpu().clone(),
            "v": None if self.v is None else self.v.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"beta1", "beta2", "eps", "step", "m", "v"} - set(state)
        if missing:
            raise ValueError(f"AdamNormalizer state is missing {sorted(missing)}")
        self.beta1, self.beta2, self.eps = float(state["beta1"]), float(state["beta2"]), float(state["eps"])
        self.step = int(state["step"])
        self.m = None if state["m"] is None else state["m"].clone()
        self.v = None if state["v"] is None else state["v"].clone()


def topk_source_mask(
    features: torch.Tensor,
    domains: torch.Tensor,
    h: int | None = None,
    *,
    hidden_size: int | None = None,
    num_domains: int | None = None,
) -> torch.Tensor:
    """CoLM Eq. 8 masks: per source, the ``h`` coordinates of largest |mean normalised feature|.

    Args:
        features: Tensor[n, d] (Adam-normalised) features.
        domains: LongTensor[n] source ids.
        h: coordinates kept per source; default ``hidden_size`` (CoLM: the model's hidden size).
        hidden_size: the default for ``h``.
        num_domains: number of sources (default ``domains.max() + 1``).

    Returns:
        BoolTensor[num_domains, d]; a source absent from the pool gets an all-False row. Ties are broken
        towards the lower coordinate index (stable).
    """
    if features.dim() != 2 or domains.shape != features.shape[:1]:
        raise ValueError(
            f"features must be [n, d] and domains [n]; got {tuple(features.shape)} and {tuple(domains.shape)}"
        )
    if h is None:
        h = hidden_size
    if h is None or h <= 0:
        raise ValueError("pass a positive h (coordinates kept per source) or hidden_size (CoLM's default)")
    d = features.shape[1]
    h = min(h, d)
    num_domains = int(domains.max()) + 1 if num_domains is None else num_domains
    mask = torch.zeros(num_domains, d, dtype=torch.bool, device=features.device)
    for q in range(num_domains):
        rows = domains == q
        if not bool(rows.any()):
            continue
        score = features[rows].mean(0).abs()
        order = torch.argsort(score, descending=True, stable=True)
        mask[q, order[:h]] = True
    return mask
