"""Estimates of a request's tokens, reserved against the per-minute and spend limits at admission
and replaced by the real usage when the answer ends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def estimate_prompt_tokens(payload: Mapping[str, Any]) -> int:
    """About four characters a token, plus a few per message: an estimate to reserve, settled later."""
    chars = 0
    count = 0
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            count += 1
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    chars += len(item)
                elif isinstance(item, int):  # a token id
                    chars += 4
                elif isinstance(item, list):  # a list of token ids
                    chars += 4 * len(item)
    return (chars + 3) // 4 + 4 * count


def estimate_output_tokens(payload: Mapping[str, Any], route: Any) -> int:
    """What the client allowed the answer (`max_completion_tokens`/`max_tokens`, else the route's)."""
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = route.max_tokens if route is not None and route.max_tokens else 0
    n = payload.get("n")
    return limit * (n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1)
