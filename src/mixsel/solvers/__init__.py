"""Pure combinatorial optimisation on tensors: facility location, OMP and matroid pursuits.

No model, no torch.distributed: every function takes tensors and returns a ``mixsel.Selection``,
deterministically (given a ``torch.Generator`` for the randomised variants), with ties broken
towards the lowest index.
"""

from mixsel.solvers.facility_location import facility_location, pairwise_l1, similarity_from_distance
from mixsel.solvers.matroid import greats_greedy, matroid_matching_pursuit
from mixsel.solvers.omp import omp, omp_kernel

__all__ = [
    "facility_location",
    "greats_greedy",
    "matroid_matching_pursuit",
    "omp",
    "omp_kernel",
    "pairwise_l1",
    "similarity_from_distance",
]
