"""Providers: where a model lives and how to reach it.

Each OpenAI-compatible provider owns one pooled `aiohttp.ClientSession`, created at start-up
and closed at shutdown; requests never create sessions. The `mock` kind answers in-process
with deterministic responses, so tiergate runs with no keys and no network (`--demo`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from yarl import URL

from ..settings import RouterConfig
from ..table.routing import ProviderSpec
from .redaction import Redactor

if TYPE_CHECKING:
    from .slots import ProviderSlots

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UpstreamResponse(Protocol):
    """The part of `aiohttp.ClientResponse` dispatch uses; the mock kind implements it too."""

    status: int
    headers: Mapping[str, str]
    content: Any  # has `iter_any()` and `readany()`

    async def read(self) -> bytes: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


class Provider:
    """An OpenAI-compatible HTTP provider with one pooled client session."""

    kind = "openai"

    def __init__(self, spec: ProviderSpec, config: RouterConfig):
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.config = config
        self.base_url = spec.base_url
        self.headers = build_headers(spec, config)
        self.has_key = provider_has_key(spec, config)
        # forwarded client headers never replace these: the table's headers and the provider's key. A
        # bring-your-own-key provider takes the client's own key, which the edge sends as Authorization;
        # one whose key goes in another header (Anthropic's x-api-key) gets it there instead (`screen`)
        key_header = spec.api_key_header.lower()
        self.own_key_header = spec.api_key_header if spec.pass_client_key and key_header != "authorization" else None
        self.protected = frozenset(name.lower() for name, _ in spec.headers) | frozenset(
            ({"authorization"} if self.own_key_header else ()) if spec.pass_client_key
            else {"authorization", key_header})
        self.redactor = Redactor(provider_secrets(spec, config))  # what tiergate sends it, kept out of answers
        self._urls: dict[str, URL] = {}
        self.session: aiohttp.ClientSession | None = None
        # Requests beyond the pool wait in tiergate's own queue (bounded, within their deadline), never
        # inside aiohttp's connector, where waiting would look like a slow provider.
        self.pool_limit = max(1, config.connection_pool_size + config.connection_pool_overflow)
        cap = spec.max_concurrency if spec.max_concurrency is not None else config.max_concurrent_per_provider
        self.capacity = min(cap, self.pool_limit) if cap and cap > 0 else self.pool_limit
        self.slots: ProviderSlots | None = None  # that queue, set by the dispatcher's ProviderLimits

    def __repr__(self) -> str:  # never shows keys
        return f"Provider(name={self.name!r}, base_url={self.base_url!r})"

    def screen(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's headers for this provider: without those it sets itself (`protected`), and with
        a bring-your-own-key client's key (Authorization, as the edge sends it) in the provider's own key
        header where that is another (`x-api-key`), so the Bearer form never reaches it."""
        screened = {k: v for k, v in headers.items() if k not in self.protected}
        own = self.own_key_header
        if own is not None:
            bearer = headers.get("authorization")
            if bearer is not None:
                screened[own] = bearer.removeprefix("Bearer ")
        return screened

    def client_key_headers(self, key: str) -> dict[str, str]:
        """A bring-your-own-key client's `key` as this provider takes its key."""
        return {self.own_key_header: key} if self.own_key_header is not None else {"Authorization": f"Bearer {key}"}

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def start(self) -> None:
        if self.session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.pool_limit,
            limit_per_host=0,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            # sock_connect, not connect: the connect budget is for the provider's TCP/TLS handshake only
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def send(self, path: str, body: bytes, headers: Mapping[str, str] | None,
             timeout: aiohttp.ClientTimeout) -> Awaitable[UpstreamResponse]:
        """POST `body` (already JSON) to `base_url + path`; await it for the response, which the
        caller releases. A plain function returning aiohttp's awaitable: one coroutine fewer per call.
        A redirect is answered, not followed: following it would carry the key and the table's headers
        (aiohttp drops only Authorization, and only across origins) to wherever it points."""
        assert self.session is not None, "provider not started"
        url = self._urls.get(path)
        if url is None:
            url = self.url(path)
        return self.session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)

    def redact(self, data: bytes) -> bytes:
        """An upstream error body without the secrets tiergate sends this provider (its key, the table's
        secret header values), whole or in part (OpenAI quotes a wrong key's first and last characters)."""
        return self.redactor.redact(data)

    async def get_json(self, path: str, timeout: float) -> Any:
        """GET a JSON document (health checks, model discovery); a redirect is a failure, not followed."""
        assert self.session is not None, "provider not started"
        async with self.session.get(self.url(path), timeout=aiohttp.ClientTimeout(total=timeout),
                                    allow_redirects=False) as resp:
            if resp.status >= 300:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=f"{self.name}: GET {path} answered {resp.status}")
            return orjson.loads(await resp.read())


USER_AGENT = "tiergate/0.1"
# the Messages API version an `anthropic` provider is called with when the client names none (a client's
# `anthropic-version` replaces it: it is no protected header)
ANTHROPIC_VERSION = "2023-06-01"


def build_headers(spec: ProviderSpec, config: RouterConfig) -> dict[str, str]:
    """Static headers for every call: JSON content type, the key, the table's extra headers."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "User-Agent": USER_AGENT}  # set here, aiohttp adds none of its own (skipping one costs per request)
    if spec.kind == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
    for name, value in spec.headers:
        expanded = _expand(value, config.env)
        if expanded is not None:
            headers[name] = expanded
    key = provider_key(spec, config)
    if key:
        if spec.api_key_header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers[spec.api_key_header] = key
    return headers


def provider_key(spec: ProviderSpec, config: RouterConfig) -> str | None:
    """The key: a literal in the table, else the env var it names, else the RouterConfig field."""
    if spec.api_key:
        return _expand(spec.api_key, config.env)
    if spec.api_key_env and config.env.get(spec.api_key_env):
        return config.env[spec.api_key_env]
    return getattr(config, f"{spec.name.replace('-', '_')}_api_key", None)


# a table header whose name says it carries a credential is a secret even when written literally
_SECRET_HEADER = re.compile(r"auth|key|token|secret|passw|credential|cookie|signature", re.IGNORECASE)


def provider_secrets(spec: ProviderSpec, config: RouterConfig) -> list[str]:
    """What tiergate sends this provider that must never come back to a client: its key, and each of
    the table's header values that comes from the environment (`${VAR}`) or is named like a credential
    (a literal `anthropic-version: 2023-06-01` is no secret)."""
    secrets = [provider_key(spec, config) or ""]
    for name, value in spec.headers:
        if _ENV_REF.search(value) or _SECRET_HEADER.search(name):
            expanded = _expand(value, config.env) or ""
            scheme, _, credential = expanded.partition(" ")
            secrets += (expanded, credential) if scheme.lower() in ("bearer", "basic", "token") else (expanded,)
    return secrets


def provider_has_key(spec: ProviderSpec, config: RouterConfig) -> bool:
    """Whether tiergate has a key to send to this provider (the mock kind needs none)."""
    return spec.kind == "mock" or bool(provider_key(spec, config))


def _expand(value: str, env: Mapping[str, str]) -> str | None:
    """Replace `${VAR}` from the environment; None when a named variable is unset."""
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        found = env.get(m.group(1))
        if found is None:
            missing = True
            return ""
        return found

    out = _ENV_REF.sub(sub, value)
    return None if missing else out


# --- the in-process mock kind ----------------------------------------------------------------


class _MockContent:
    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def readany(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


class MockResponse:
    def __init__(self, status: int, body: bytes | list[bytes], content_type: str = "application/json"):
        self.status = status
        self.headers = {"Content-Type": content_type}
        self._body = body if isinstance(body, bytes) else b"".join(body)
        self.content = _MockContent(list(body) if isinstance(body, list) else [body])

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


MOCK_CREATED = 1_700_000_000


class MockProvider(Provider):
    """Answers chat, completions and embeddings in-process, deterministically, echoing the model."""

    kind = "mock"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, path: str, body: bytes, headers: Mapping[str, str] | None,  # type: ignore[override]
                   timeout: aiohttp.ClientTimeout) -> MockResponse:
        request = orjson.loads(body)
        model = str(request.get("model", "mock"))
        if path == "/chat/completions":
            return self._chat(request, model)
        if path == "/completions":
            return self._completion(request, model)
        if path == "/embeddings":
            return MockResponse(200, orjson.dumps(mock_embeddings(request, model)))
        return MockResponse(404, orjson.dumps({"error": {"message": f"mock: no {path}",
                                                         "type": "invalid_request_error",
                                                         "param": None, "code": "not_found"}}))

    async def get_json(self, path: str, timeout: float) -> Any:
        if path == "/models":
            ids = self.spec.models or ("mock-model",)
            return {"object": "list", "data": [
                {"id": m, "object": "model", "created": MOCK_CREATED, "owned_by": self.name}
                for m in ids]}
        raise aiohttp.ClientError(f"mock: no {path}")

    def _chat(self, request: dict[str, Any], model: str) -> MockResponse:
        messages = request.get("messages") or []
        prompt = " ".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
        last_user = next((_text(m.get("content")) for m in reversed(messages)
                          if isinstance(m, dict) and m.get("role") == "user"), "")
        words, finish = _answer_words(model, last_user, request.get("max_tokens")
                                      or request.get("max_completion_tokens"))
        usage = _usage(prompt, words)
        rid = "chatcmpl-mock-" + _digest(body_key(request))
        if not request.get("stream"):
            return MockResponse(200, orjson.dumps({
                "id": rid, "object": "chat.completion", "created": MOCK_CREATED, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage}))
        base = {"id": rid, "object": "chat.completion.chunk", "created": MOCK_CREATED, "model": model}
        deltas = [{"role": "assistant", "content": ""}] + [
            {"content": (w if i == 0 else " " + w)} for i, w in enumerate(words)]
        events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        return self._sse(events, base, usage, request)

    def _completion(self, request: dict[str, Any], model: str) -> MockResponse:
        prompt = request.get("prompt", "")
        prompt_text = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        words, finish = _answer_words(model, prompt_text, request.get("max_tokens"))
        usage = _usage(prompt_text, words)
        rid = "cmpl-mock-" + _digest(body_key(request))
        text = " ".join(words)
        if not request.get("stream"):
            return MockResponse(200, orjson.dumps({
                "id": rid, "object": "text_completion", "created": MOCK_CREATED, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage}))
        base = {"id": rid, "object": "text_completion", "created": MOCK_CREATED, "model": model}
        events = [{**base, "choices": [{"index": 0, "text": (w if i == 0 else " " + w), "logprobs": None,
                                        "finish_reason": None}]} for i, w in enumerate(words)]
        events.append({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                            "finish_reason": finish}]})
        return self._sse(events, base, usage, request)

    @staticmethod
    def _sse(events: list[dict[str, Any]], base: dict[str, Any], usage: dict[str, int],
             request: dict[str, Any]) -> MockResponse:
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            for event in events:
                event["usage"] = None
            events.append({**base, "choices": [], "usage": usage})
        chunks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
        chunks.append(b"data: [DONE]\n\n")
        return MockResponse(200, chunks, content_type="text/event-stream")


def mock_embeddings(request: dict[str, Any], model: str) -> dict[str, Any]:
    raw = request.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    dims = request.get("dimensions") if isinstance(request.get("dimensions"), int) else 8
    data = []
    tokens = 0
    for i, item in enumerate(inputs):
        text = item if isinstance(item, str) else orjson.dumps(item).decode()
        tokens += max(1, len(text.split()))
        vector = _vector(text, max(1, min(dims, 4096)))
        if request.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def body_key(request: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in request.items() if k not in ("stream", "stream_options")},
                        option=orjson.OPT_SORT_KEYS)


def _vector(text: str, dims: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b / 127.5) - 1.0 for b in digest)
        counter += 1
    return [round(x, 6) for x in out[:dims]]


def _answer_words(model: str, prompt: str, max_tokens: Any) -> tuple[list[str], str]:
    echo = prompt.split()[:24]
    words = ["Mock", "answer", "from", model + ":"] + (echo or ["hello"])
    if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
        return words[:max_tokens], "length"
    return words, "stop"


def _usage(prompt: str, words: list[str]) -> dict[str, int]:
    prompt_tokens = max(1, len(prompt.split()))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words)}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def make_provider(spec: ProviderSpec, config: RouterConfig) -> Provider:
    return MockProvider(spec, config) if spec.kind == "mock" else Provider(spec, config)

