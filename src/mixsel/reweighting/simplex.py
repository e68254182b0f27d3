"""Pure helpers on the probability simplex shared by the reweighters (float64 throughout).

Everything here is tensor-in / tensor-out with no state: normalising user weights, smoothing
toward uniform, and one exponentiated-gradient (mirror descent with the entropy mirror map) step
computed stably in log space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mixsel.errors import ConfigError

__all__ = [
    "as_domain_vector",
    "exponentiated_step",
    "normalize",
    "smooth",
    "uniform",
]

DTYPE = torch.float64


def uniform(num_domains: int) -> torch.Tensor:
    """Tensor[D] float64 with every entry ``1 / D``."""
    if num_domains < 1:
        raise ConfigError(f"num_domains={num_domains}; a reweighter needs at least one domain.")
    return torch.full((num_domains,), 1.0 / num_domains, dtype=DTYPE)


def as_domain_vector(
    values: Sequence[float] | Mapping[str, float] | torch.Tensor, domains: Sequence[str], what: str
) -> torch.Tensor:
    """Turn a list (in domain order) or a ``{domain: value}`` dict into a float64 Tensor[D].

    Args:
        values: one number per domain, as a sequence/tensor in ``domains`` order or a mapping by name.
        domains: the domain names, in id order.
        what: the argument name, used in error messages.

    Raises:
        ValueError: wrong length, missing/unknown domain names, or non-finite entries.
    """
    if isinstance(values, Mapping):
        missing = [d for d in domains if d not in values]
        unknown = [k for k in values if k not in domains]
        if missing or unknown:
            raise ConfigError(
                f"{what} must give exactly one value per domain; missing {missing}, unknown {unknown}. "
                f"Valid domain names: {list(domains)}."
            )
        out = torch.tensor([float(values[d]) for d in domains], dtype=DTYPE)
    else:
        out = torch.as_tensor(values, dtype=DTYPE).reshape(-1).clone()
        if out.numel() != len(domains):
            raise ConfigError(
                f"{what} has {out.numel()} entries but there are {len(domains)} domains {list(domains)}; "
                "give one value per domain in id order, or a dict keyed by domain name."
            )
    bad = [domains[i] for i in torch.nonzero(~torch.isfinite(out)).flatten().tolist()]
    if bad:
        raise ConfigError(f"{what} is not finite for domains {bad}; give finite numbers.")
    return out


def normalize(weights: torch.Tensor, what: str = "weights") -> torch.Tensor:
    """Scale non-negative ``weights`` to sum to one (float64).

    Raises:
        ValueError: a negative entry, or all entries zero.
    """
    w = torch.as_tensor(weights, dtype=DTYPE)
    if bool((w < 0).any()):
        raise ConfigError(f"{what} has negative entries {w.tolist()}; domain weights must be >= 0.")
    total = float(w.sum())
    if not total > 0 or not torch.isfinite(torch.tensor(total)):
        raise ConfigError(f"{what} sums to {total}; give at least one positive, finite weight.")
    return w / total


def smooth(weights: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Mix with the uniform distribution: ``(1 - epsilon) * w + epsilon / D`` (DoReMi Alg. 1, line 9)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ConfigError(f"smoothing={epsilon} must lie in [0, 1].")
    w = torch.as_tensor(weights, dtype=DTYPE)
    return (1.0 - epsilon) * w + epsilon / w.numel()


def exponentiated_step(weights: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """One exponentiated-gradient step ``w' ∝ w * exp(gain)``, computed in log space.

    This is mirror ascent with the negative-entropy mirror map on the simplex. Entries with
    ``w == 0`` stay at zero. The log-sum-exp normalisation keeps the result finite for any
    finite ``gain`` (large gains make ``w'`` one-hot instead of overflowing).

    Args:
        weights: Tensor[D] on the simplex.
        gain: Tensor[D] finite additive change of ``log w`` (e.g. ``eta * excess_loss``).

    Returns:
        Tensor[D] float64 on the simplex.
    """
    w = torch.as_tensor(weights, dtype=DTYPE)
    g = torch.as_tensor(gain, dtype=DTYPE)
    # Keep ``eta * lambda`` representable: a gain beyond 1e300 already means "one-hot" in float64.
    g = g.clamp(min=-1e300, max=1e300)
    logits = torch.log(w) + g
    # Subtract the max before exponentiating; -inf (zero weights) stays -inf -> 0.
    logits = logits - logits.max()
    out = torch.exp(logits)
    return out / out.sum()
