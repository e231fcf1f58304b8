"""Server-side GFMFR algorithm as pure functions of tensors and seeds.

aggregation: mean_aggregate (step 5a); grouping: group_clients, align_groups,
group_targets (5b-5d); fusion: GroupFusion and its modules, fused_items,
train_fusion, make_fusion_optimizer (5e), teacher_preferences (5f); profile: the
clients' content profile (fedrpc's extension).
"""
from fedrpc.algorithms.aggregation import mean_aggregate
from fedrpc.algorithms.fusion import (FUSIONS, AttentionFusion, GateFusion, GroupFusion,
                                      MLPFusion, MoEFusion, SumFusion, fused_items,
                                      make_fusion, make_fusion_optimizer,
                                      teacher_logits, teacher_preferences, train_fusion)
from fedrpc.algorithms.grouping import (align_groups, group_clients, group_targets,
                                        lopsided_groups, rbf_affinity)
from fedrpc.algorithms.profile import (PROFILE_FEATURES, blend, profile_scores,
                                       profile_vectors, standardise_rows)

__all__ = [
    "mean_aggregate",
    "group_clients", "align_groups", "group_targets", "lopsided_groups", "rbf_affinity",
    "GroupFusion", "SumFusion", "MLPFusion", "GateFusion", "AttentionFusion", "MoEFusion",
    "FUSIONS", "make_fusion", "fused_items", "train_fusion", "make_fusion_optimizer",
    "teacher_logits", "teacher_preferences",
    "PROFILE_FEATURES", "profile_vectors", "profile_scores", "standardise_rows", "blend",
]
