"""Model discovery: ask each provider's `GET /models` what it serves, and at what price.

OpenRouter lists `pricing: {prompt, completion}` in USD per token (as strings) and
`context_length`; other OpenAI-compatible providers list ids only. Prices are kept in USD
per million tokens, as `llm_models` and the table's `pricing` hold them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from ..engine.providers import Provider

log = logging.getLogger("tiergate.discovery")


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    """One model a provider lists: `id` as the provider names it, `ref` as tiergate does."""

    provider: str
    model: str
    context_window: int | None = None
    input_price: float | None = None   # USD per million input tokens
    output_price: float | None = None  # USD per million output tokens

    @property
    def id(self) -> str:
        return self.model

    @property
    def ref(self) -> str:
        return f"{self.provider}/{self.model}"

    def dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.model, "ref": self.ref}


class Discovery(list[DiscoveredModel]):
    """The models found, every provider's in turn: a list. Beside it, `models` groups them by
    provider (one that answered with none is there, empty) and `errors` maps each provider that
    could not be asked to the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, list[DiscoveredModel]] = {}
        self.errors: dict[str, str] = {}

    def add(self, provider: str, models: list[DiscoveredModel]) -> None:
        self.models[provider] = models
        self.extend(models)

    def all(self) -> list[DiscoveredModel]:
        return list(self)


def parse_listing(provider: str, body: Any) -> list[DiscoveredModel]:
    """An OpenAI-style `{"data": [{"id": ...}, ...]}` listing; entries without a string id are skipped."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("GET /models did not answer {\"data\": [...]}")
    found: dict[str, DiscoveredModel] = {}
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"].strip():
            continue
        pricing = entry.get("pricing") if isinstance(entry.get("pricing"), dict) else {}
        model_id = entry["id"].strip()
        found[model_id] = DiscoveredModel(
            provider, model_id,
            context_window=_whole(entry.get("context_length", entry.get("context_window"))),
            input_price=_per_million(pricing.get("prompt")),
            output_price=_per_million(pricing.get("completion")))
    return list(found.values())


async def discover(providers: Mapping[str, Provider], timeout: float) -> Discovery:
    """List every provider's models concurrently; one provider failing does not stop the others."""
    names = list(providers)
    answers = await asyncio.gather(*(providers[n].get_json("/models", timeout) for n in names),
                                   return_exceptions=True)
    result = Discovery()
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, asyncio.CancelledError):
            raise answer
        if isinstance(answer, (aiohttp.ClientError, TimeoutError, ValueError)):
            result.errors[name] = _reason(answer)
        elif isinstance(answer, BaseException):
            raise answer
        else:
            try:
                result.add(name, parse_listing(name, answer))
            except ValueError as exc:
                result.errors[name] = str(exc)
        if name in result.errors:
            log.warning("discovery: %s: %s", name, result.errors[name])
    return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "GET /models timed out"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"GET /models answered {exc.status}"
    return f"GET /models failed: {type(exc).__name__}: {exc}"


def _per_million(raw: Any) -> float | None:
    """USD per token (a string or number) -> USD per million tokens; negative means 'varies'."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    if value < 0 or value != value:
        return None
    return round(value * 1_000_000, 6)


def _whole(raw: Any) -> int | None:
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None
