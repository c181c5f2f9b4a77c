"""`Choosing`: what a per-request strategy may consult about one request, made only for routes that
choose per request (the usual `ordered` route is planned once and never makes one).

The affinity key is the request's `user` field (OpenAI's end-user id; Anthropic's `metadata.user_id`):
when it is given, `weighted` draws from it, so one user (one conversation) stays on one deployment for
as long as the weights do not change; otherwise the draw is random.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..limits.estimate import estimate_output_tokens, estimate_prompt_tokens

if TYPE_CHECKING:
    from ..table.routing import Pricing, RouteDecision
    from ..types import ModelRef
    from .load import DeploymentLoad

_MASK = (1 << 64) - 1
_DEFAULT_ANSWER_TOKENS = 256  # the answer's size when neither the client nor the route bounds it


def affinity_key(payload: Mapping[str, Any]) -> str | None:
    user = payload.get("user")
    if isinstance(user, str) and user:
        return user
    metadata = payload.get("metadata")
    if isinstance(metadata, dict):
        user = metadata.get("user_id")
        if isinstance(user, str) and user:
            return user
    return None


class Choosing:
    """One request's draws (random, or from its affinity key), the load of the deployments, the
    request's expected price at each deployment."""

    __slots__ = ("load", "rng", "payload", "decision", "_state", "_tokens")
    _UNREAD = -1  # the affinity key not looked for yet (only `weighted` draws from it)

    def __init__(self, load: DeploymentLoad, rng: random.Random, payload: Mapping[str, Any],
                 decision: RouteDecision):
        self.load = load
        self.rng = rng
        self.payload = payload
        self.decision = decision
        self._state: int | None = self._UNREAD
        self._tokens: tuple[int, int] | None = None

    def unit(self) -> float:
        """A draw in [0, 1): from the affinity key when there is one (the same key, the same draws in
        the same order), else random."""
        state = self._state
        if state == self._UNREAD:
            key = affinity_key(self.payload)
            state = self._state = (int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
                                   if key is not None else None)
        if state is None:
            return self.rng.random()
        # a 64-bit LCG step (Knuth's MMIX constants) on the key's hash: stable across processes and runs
        state = self._state = (state * 6364136223846793005 + 1442695040888963407) & _MASK
        return (state >> 11) / float(1 << 53)

    def two(self, n: int) -> tuple[int, int]:
        """Two different indices below `n` (n >= 2), at random: power of two choices."""
        rng = self.rng
        if n == 2:
            return (0, 1) if rng.random() < 0.5 else (1, 0)
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        return i, (j + 1 if j >= i else j)

    def price(self, ref: ModelRef) -> float:
        """The request's expected price at `ref` (its prompt's estimate, the answer the client or route
        allows, else a typical one); infinite when the table has no price for it."""
        pricing: Pricing | None = self.decision.prices.get(ref)
        if pricing is None:
            return math.inf
        tokens = self._tokens
        if tokens is None:
            answer = estimate_output_tokens(self.payload, self.decision.route) or _DEFAULT_ANSWER_TOKENS
            tokens = self._tokens = (estimate_prompt_tokens(self.payload), answer)
        return tokens[0] * pricing.input + tokens[1] * pricing.output
