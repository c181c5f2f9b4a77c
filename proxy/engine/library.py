"""The library API of a router: `complete`, `complete_text`, `stream`, `embed`, for in-process callers.

Each call opens a request record, goes through the same `dispatch` as an HTTP request and hands the
record to `finish`, so metrics, logs, limits and traces see in-process calls as they see HTTP ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ..adapters import CHAT, COMPLETIONS, EMBEDDINGS
from ..outcome import RequestRecord, new_request_id
from ..types import InvalidRequestError, LLMResponse, ModelTier, UpstreamError, UseCase

if TYPE_CHECKING:
    from ..adapters import Endpoint
    from ..outcome import Result


class LibraryAPI:
    """Mixed into `Router`, whose `dispatch` and `finish` it calls."""

    async def dispatch(self, endpoint: Endpoint, payload: dict[str, Any], record: RequestRecord, *,
                       use_case: str | None = None, tier: str | None = None, timeout: float | None = None,
                       headers: Mapping[str, str] | None = None, cache_control: str | None = None,
                       api_key_name: str | None = None) -> Result:
        raise NotImplementedError

    def finish(self, record: RequestRecord, error: BaseException | None = None) -> None:
        raise NotImplementedError

    async def complete(self, messages: str | list[dict[str, Any]], use_case: UseCase | str | None = None,
                       tier: ModelTier | str | None = None, **params: Any) -> LLMResponse:
        """A chat completion. `messages` may be a plain string (one user message)."""
        payload = {"messages": _messages(messages), **params}
        payload.pop("stream", None)
        return await self._complete(CHAT, payload, use_case, tier)

    async def complete_text(self, prompt: str | list[str], use_case: UseCase | str | None = None,
                            tier: ModelTier | str | None = None, **params: Any) -> LLMResponse:
        """A legacy text completion (`/v1/completions`)."""
        payload = {"prompt": prompt, **params}
        payload.pop("stream", None)
        return await self._complete(COMPLETIONS, payload, use_case, tier)

    async def stream(self, messages: str | list[dict[str, Any]], use_case: UseCase | str | None = None,
                     tier: ModelTier | str | None = None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """A streamed chat completion: yields each chunk as a dict, as the OpenAI API sends it."""
        payload = {"messages": _messages(messages), **params, "stream": True}
        record = RequestRecord(new_request_id(), CHAT.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(CHAT, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            assert result.stream is not None
            try:
                async for event in iter_sse_json(result.stream):
                    yield event
            finally:
                await result.stream.aclose()  # type: ignore[attr-defined]  # a shared stream counts its readers
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)

    async def embed(self, input: str | list[str], use_case: UseCase | str | None = None,
                    tier: ModelTier | str | None = None, **params: Any) -> dict[str, Any]:
        """Embeddings; returns the OpenAI response body as a dict."""
        payload = {"input": input, **params}
        record = RequestRecord(new_request_id(), EMBEDDINGS.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(EMBEDDINGS, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            body = orjson.loads(result.body or b"{}")
            body.setdefault("metadata", {}).update(_metadata(record))
            return body
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)

    async def _complete(self, endpoint: Endpoint, payload: dict[str, Any], use_case: Any,
                        tier: Any) -> LLMResponse:
        record = RequestRecord(new_request_id(), endpoint.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(endpoint, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            data = result.data if result.data is not None else orjson.loads(result.body or b"{}")
            return LLMResponse(
                id=data.get("id", ""), model=data.get("model", result.ref.model),
                choices=data.get("choices", []), usage=data.get("usage") or {},
                created=data.get("created", 0), cached=record.cache == "hit",
                latency_ms=record.latency_ms, metadata=_metadata(record))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)


async def iter_sse_json(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE byte stream into the JSON objects of its `data:` lines; an error event raises."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                obj = orjson.loads(data)
                if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                    err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                    raise UpstreamError(str(err.get("message")), code=err.get("code"))
                yield obj


def _messages(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a string or a list of messages", param="messages")
    return messages


def _value(x: Any) -> str | None:
    if x is None:
        return None
    return x.value if isinstance(x, (UseCase, ModelTier)) else str(x)


def _metadata(record: RequestRecord) -> dict[str, Any]:
    return {"request_id": record.request_id, "route": record.route,
            "provider": record.ref.provider if record.ref else None,
            "model": str(record.ref) if record.ref else None,
            "attempts": record.tries, "cache": record.cache}
