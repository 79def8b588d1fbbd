"""A dataset row as the model will see it: rendered through one of LLaMA-Factory's chat templates.

No tokenizer is loaded: special tokens the template inserts by name (``bos_token``, ``eos_token``)
are shown as ``<bos>`` / ``<eos>``, so a person can see where turns start and end.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

SPECIAL_NAMES = {"bos_token": "<bos>", "eos_token": "<eos>"}


@lru_cache(maxsize=1)
def template_names() -> list[str]:
    from llamafactory.data.template import TEMPLATES

    return sorted(TEMPLATES)


def _text(slots: list[Any]) -> str:
    out = []
    for slot in slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, (set, frozenset)):
            out.extend(SPECIAL_NAMES.get(name, f"<{name}>") for name in sorted(slot))
        elif isinstance(slot, dict):
            out.extend(SPECIAL_NAMES.get(name, f"<{name}>") for name in slot)
    return "".join(out)


def render(template_name: str, row: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) of a normalised row ``{"system": str|None, "messages": [{"role", "content"}]}``:
    everything before the last assistant message, and that message (what the loss is computed on)."""
    from llamafactory.data.template import TEMPLATES

    template = TEMPLATES.get(template_name)
    if template is None:
        raise ValueError(f"unknown template '{template_name}': choose one of LLaMA-Factory's templates")
    messages = list(row.get("messages") or [])
    system = row.get("system") or template.default_system or ""
    formatters = {"user": template.format_user, "assistant": template.format_assistant,
                  "observation": template.format_observation, "function": template.format_function}
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    parts = [_text(template.format_prefix.apply())]
    if system:
        parts.append(_text(template.format_system.apply(content=system)))
    for message in messages[:last]:
        formatter = formatters.get(message.get("role"), template.format_user)
        try:
            parts.append(_text(formatter.apply(content=message.get("content") or "")))
        except Exception:  # a function call that is not valid JSON: show it as written
            parts.append(str(message.get("content") or ""))
    response = ""
    if last < len(messages):
        response = _text(template.format_assistant.apply(content=messages[last].get("content") or ""))
    return "".join(parts), response
