"""What varies by API family, in one object per family: `Endpoint`.

An endpoint says what a request must carry and of which types, what a successful answer looks like
(the list it carries, the events a complete stream ends with), which of a route's defaults it takes
and under which names, whether its answers may be cached, and, where a provider speaks another API,
how a call is translated for that provider (`Translation`). The router, the planner and the attempt
loop read these as data; none of them asks which family a request is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..table.routing import RouteDecision
from ..types import InvalidRequestError

if TYPE_CHECKING:
    from ..fleet.affinity import ResponseAffinity
    from ..outcome import Result
    from ..table.routing import RoutingTable
    from ..types import ModelRef, Route, TiergateError

DONE = b"data: [DONE]"  # the end of a Chat Completions / Completions stream


def stream_error_event(message: str, *, code: str, error_type: str = "upstream_error") -> bytes:
    """OpenAI's SSE error event (`data: {"error": ...}`, which the OpenAI SDK raises as `APIError`): how a
    Chat Completions or Completions stream that cannot reach its end is ended."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": error_type,
                                               "param": None, "code": code}}) + b"\n\n"


# field -> accepted JSON types; None is accepted for every optional field
_NUMBER = (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "messages": (list,), "prompt": (str, list), "input": (str, list),
    "stream": (bool,), "stream_options": (dict,), "max_tokens": (int,),
    "max_completion_tokens": (int,), "temperature": _NUMBER, "top_p": _NUMBER, "n": (int,),
    "stop": (str, list), "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "logit_bias": (dict,), "logprobs": (bool, int), "top_logprobs": (int,), "user": (str,),
    "seed": (int,), "tools": (list,), "tool_choice": (str, dict), "parallel_tool_calls": (bool,),
    "response_format": (dict,), "functions": (list,), "function_call": (str, dict),
    "dimensions": (int,), "encoding_format": (str,), "metadata": (dict,), "echo": (bool,),
    "suffix": (str,), "best_of": (int,), "store": (bool,), "modalities": (list,),
    "reasoning_effort": (str,), "service_tier": (str,),
    # the Responses API's own
    "instructions": (str, list), "max_output_tokens": (int,), "previous_response_id": (str,),
    "text": (dict,), "reasoning": (dict,), "include": (list,),
}
# the exact types orjson produces for each field (None: the field is optional)
_EXACT_TYPES: dict[str, frozenset[type]] = {name: frozenset(types) | {type(None)}
                                            for name, types in FIELD_TYPES.items()}
_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean",
               int: "an integer", float: "a number"}


@dataclass(frozen=True, slots=True)
class Translation:
    """How one candidate is sent when its provider speaks another API than the client's: the
    provider's endpoint and the request in its API (sent like any payload: `model` set per candidate,
    serialised once), and what turns its answer (a body, or a stream's chunks) back into the client's."""

    endpoint: Endpoint
    payload: dict[str, Any]
    transform_body: Callable[[bytes], bytes]
    transform_stream: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]

    def apply(self, result: Result) -> Result:
        if result.body is not None:
            result.body = self.transform_body(result.body)
        if result.stream is not None:
            result.stream = self.transform_stream(result.stream)
        return result


class StreamTranslator(Protocol):
    """One stream's translation: fed the provider's bytes as they come, gives the client's; `close` at its end."""

    def feed(self, data: bytes) -> bytes: ...

    def close(self) -> bytes: ...


def body_translation(convert: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    """A `transform_body`: the provider's JSON answer (an empty object when it is not one) through `convert`."""

    def transform_body(data: bytes) -> bytes:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = {}
        return orjson.dumps(convert(answer if type(answer) is dict else {}))

    return transform_body


def stream_translation(make: Callable[[], StreamTranslator]) -> Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]:
    """A `transform_stream`: each chunk through a translator `make` gives for the stream, read to the stream's
    end (so that it counts as complete), then what the translator holds back."""

    async def transform_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        translator = make()
        try:
            async for chunk in chunks:
                out = translator.feed(chunk)
                if out:
                    yield out
            tail = translator.close()
            if tail:
                yield tail
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return transform_stream


def split_for_translation(decision: RouteDecision, foreign: Collection[ModelRef], translate: Callable[[], Any],
                          speaks: str) -> tuple[RouteDecision, Any]:
    """A call for candidates some of whose providers (`foreign`) speak another API: `translate()`'s request
    for them. When it has no form in their API, the call goes only to the others (`speaks`: what the foreign
    ones speak, for the 400 naming the field when there are no others); then the request is None."""
    try:
        return decision, translate()
    except InvalidRequestError as exc:
        native = tuple(c for c in decision.candidates if c not in foreign)
        if not native:
            names = ", ".join(sorted({c.provider for c in foreign}))
            raise InvalidRequestError(f"route {decision.name}: {exc.message} (providers {names} {speaks})",
                                      param=exc.param, code=exc.code) from None
        return RouteDecision(decision.name, native, decision.route, decision.plans), None


# per candidate: None sends the request as written; a Translation sends it in the provider's API
Translator = Callable[["ModelRef"], "Translation | None"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API operation tiergate routes (Chat Completions, Completions, Embeddings, Responses...)."""

    name: str  # as it appears in metrics and the request log
    path: str  # below the provider's base URL
    operation: str  # the OpenTelemetry GenAI operation name
    streamable: bool
    kind: str = "chat"  # which of a route's models serve it: chat, embeddings, completions
    required: str | None = None  # the field every request must carry
    answer_key: str | None = None  # the list a successful answer carries; anything else is no answer
    done: tuple[bytes, ...] = (DONE,)  # the events a complete stream ends with (any one of them)
    usage_option: bool = False  # takes `stream_options.include_usage`, so tiergate may ask for usage
    deterministic: bool = False  # the same request gives the same answer: cacheable without a seed
    batchable: bool = False  # requests with the same options may go upstream as one (and be split back)
    stateful: bool = False  # has a say in the candidates and keeps what it needs of answers (stored objects)
    continuable: bool = True  # stream recovery may continue its stream (chat-shaped; Messages' typed events not)
    # how tiergate ends a stream of this API that cannot reach its end (a break, a stall, a shutdown):
    # `stream_error(message, code=...)` gives the family's own error event, so its SDK raises it
    stream_error: Callable[..., bytes] = stream_error_event

    def validate(self, payload: Any, max_messages: int) -> None:
        """Type-check the fields tiergate knows; anything else goes upstream untouched."""
        if type(payload) is not dict:
            raise InvalidRequestError("the request body must be a JSON object")
        required = self.required
        if required is not None and payload.get(required) is None:
            raise InvalidRequestError(f"'{required}' is a required property", param=required)
        exact = _EXACT_TYPES
        for name, value in payload.items():
            allowed = exact.get(name)
            if allowed is not None and type(value) not in allowed:  # JSON gives exact types: no subclasses
                expected = " or ".join(_TYPE_NAMES[t] for t in FIELD_TYPES[name] if t in _TYPE_NAMES)
                raise InvalidRequestError(f"'{name}' must be {expected}", param=name)

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        """Fill in the route's defaults where the client sent nothing."""
        if (route.max_tokens is not None and "max_tokens" not in payload
                and "max_completion_tokens" not in payload):
            payload["max_tokens"] = route.max_tokens
        if route.temperature is not None and "temperature" not in payload:
            payload["temperature"] = route.temperature

    def cacheable(self, route: Route | None, payload: dict[str, Any], stream: bool) -> bool:
        """`always`, `never`, or `auto`: only deterministic requests (temperature 0 once the route's
        defaults are in, or a seed)."""
        policy = route.cache if route is not None else "auto"
        if policy != "auto":
            return policy == "always"
        return self.deterministic or payload.get("temperature") == 0 or payload.get("seed") is not None

    def at_query(self, query: str) -> Endpoint:
        """The endpoint for a call whose URL carries `query`: most families send none upstream."""
        return self

    def cache_variant(self, headers: Mapping[str, str] | None) -> str:
        """What of the headers sent upstream (names lower-cased) can change the answer, so is part of its
        cache key: most families' answers depend on the body alone."""
        return ""

    def error_body(self, exc: TiergateError) -> bytes | None:
        """An error in the family's own shape; None: OpenAI's (`exc.to_body()`), which most families use."""
        return None

    async def candidates(self, decision: RouteDecision, payload: dict[str, Any], table: RoutingTable,
                         affinity: ResponseAffinity) -> tuple[RouteDecision, Translator | None]:
        """The route's candidates for this request, and how each is sent (None: as written). Asked only
        of a `stateful` endpoint."""
        return decision, None

    async def answered(self, result: Result, payload: dict[str, Any], table: RoutingTable,
                       affinity: ResponseAffinity) -> Result:
        """The answer is in: what the family keeps of it (a stored response's holder) before it goes out.
        Asked only of a `stateful` endpoint."""
        return result
