"""Per-example signals from (model, batch), computed once per pool.

* :mod:`~mixsel.features.loss`: per-example loss, confidence, perplexity, completion length, and the
  LM-head gradient factors, from one no-grad forward (:func:`forward_stats`);
* :mod:`~mixsel.features.lm_head`: the chunked inference pass behind it (:func:`head_pass`: the head
  at target tokens only, never the ``[n, T, V]`` logits) and the exact LM-head Grams by vocabulary
  blocks;
* :mod:`~mixsel.features.capture`: per-example gradient features captured inside a training step's
  own backward (:class:`GradientCapture`, DoGraph's domain gradients);
* :mod:`~mixsel.features.grads`: exact per-example gradients of the LM head (:func:`last_layer_grads`)
  or of chosen linear / LoRA layers (:func:`linear_grads`; the last transformer blocks' layers by
  :func:`block_modules`) and their inner products by the ghost
  identity or by materialising, whichever is cheaper (:func:`last_layer_gram`, :func:`linear_gram`);
* :mod:`~mixsel.features.projection`: seeded random and Kronecker-factored projections;
* :mod:`~mixsel.features.zeroth_order`: CoLM's SPSA features, Adam normalisation and top-h masks;
* :mod:`~mixsel.features.hidden`: mean-pooled hidden states;
* :func:`pool_gradient_features`: the one call the training step makes.
"""

from mixsel.features.capture import GradientCapture
from mixsel.features.grads import (
    GRAM_METHODS,
    block_modules,
    capture_linear_factors,
    decoder_layers,
    factor_gram,
    factor_sq_norms,
    find_last_module,
    ghost_gram,
    last_layer_grads,
    last_layer_gram,
    linear_grads,
    linear_gram,
    materialize_grads,
    resolve_modules,
)
from mixsel.features.hidden import mean_pool
from mixsel.features.lm_head import HeadTokens, head_pass, target_losses
from mixsel.features.loss import (
    GradFactors,
    LMHeadFactors,
    forward_stats,
    lm_head_factors,
    per_example_loss,
    stats_from_logits,
    target_mask,
    token_losses,
)
from mixsel.features.pool import pool_gradient_features
from mixsel.features.projection import PROJECTION_KINDS, KroneckerProjector, RandomProjector, kronecker_dims
from mixsel.features.zeroth_order import (
    AdamNormalizer,
    SPSAEstimate,
    spsa_direction,
    spsa_features,
    topk_source_mask,
)

__all__ = [
    "GRAM_METHODS",
    "PROJECTION_KINDS",
    "AdamNormalizer",
    "GradFactors",
    "GradientCapture",
    "HeadTokens",
    "KroneckerProjector",
    "LMHeadFactors",
    "RandomProjector",
    "SPSAEstimate",
    "block_modules",
    "capture_linear_factors",
    "decoder_layers",
    "factor_gram",
    "factor_sq_norms",
    "find_last_module",
    "forward_stats",
    "ghost_gram",
    "head_pass",
    "kronecker_dims",
    "last_layer_grads",
    "last_layer_gram",
    "linear_grads",
    "linear_gram",
    "lm_head_factors",
    "materialize_grads",
    "mean_pool",
    "per_example_loss",
    "pool_gradient_features",
    "resolve_modules",
    "spsa_direction",
    "spsa_features",
    "stats_from_logits",
    "target_losses",
    "target_mask",
    "token_losses",
    "topk_source_mask",
]
