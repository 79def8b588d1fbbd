"""LLaMA-Factory's chat template names, for checking the admin's model catalog."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def known_templates() -> frozenset[str]:
    """Every template name LLaMA-Factory registers (``llamafactory.data.template.TEMPLATES``)."""
    from llamafactory.data.template import TEMPLATES

    return frozenset(TEMPLATES)
