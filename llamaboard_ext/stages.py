"""LLaMA-Factory's training stages, as the form names them."""

from __future__ import annotations


def uses_pair_data(stage_label: str | None) -> bool | None:
    """True for stages trained on chosen/rejected pairs (DPO, RM, ...); None when no stage is given."""
    if not stage_label:
        return None
    from llamafactory.extras.constants import STAGES_USE_PAIR_DATA, TRAINING_STAGES

    return TRAINING_STAGES.get(stage_label, stage_label) in STAGES_USE_PAIR_DATA
