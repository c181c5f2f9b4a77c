"""What an attempt's failure was, and what the request's answer is when every candidate failed.

A retryable failure (connection error, timeout, 5xx, 408, 429, an answer that is not one) moves on to
the next candidate; a client error (other 4xx) is the provider's answer and goes back at once, except a
400 that says the prompt does not fit the model's context window (`ContextTooLong`): a model with a
larger window may take it. When none answers, one error of the status class the deciding failure had:
the last provider's 429 stays a 429 with its Retry-After, its 5xx that 5xx, its context-window 400
that 400 as it came; unreachable is 502, a deadline 504.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ...outcome import SKIPPED, Attempt
from ...types import ModelRef, RateLimitError, TiergateError, UpstreamError, UpstreamStatusError

if TYPE_CHECKING:
    from ..breaker import BreakerBoard
    from ..providers import Provider, UpstreamResponse

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# A 400 saying the prompt is longer than the model's window: OpenAI's code, and what compatible servers
# (vLLM, llama.cpp, Ollama, Anthropic's API, gateways) write in the message instead
_CONTEXT_400 = re.compile(rb"context_length_exceeded|maximum context length|context window|context length exceeded"
                          rb"|too many tokens|prompt is too long|input is too long|exceeds the available context",
                          re.IGNORECASE)
# the window the provider names in that message ("maximum context length is 8192 tokens",
# "context window of 8192", "210000 tokens > 200000 maximum")
_WINDOW = re.compile(rb"maximum context length is (\d+)|context (?:window|length|size) (?:of|is) (\d+)"
                     rb"|> ?(\d+) maximum", re.IGNORECASE)
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError, OSError)


class Retryable(Exception):
    """A failed attempt that moves on to the next candidate; keeps what the provider said (its error
    body, redacted, and headers) in case this failure decides the answer."""

    def __init__(self, attempt: Attempt, retry_after: float | None = None, *, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None):
        self.attempt = attempt
        self.retry_after = retry_after
        self.body = body
        self.headers = headers


class ContextTooLong(Retryable):
    """The provider said the prompt does not fit this model's context window (a 400): the next candidate
    with a larger window may take it; this deployment is not tried again for the request, and its
    breaker does not count it (it answered). `window` is the window its message names, if any;
    `error` is its own answer, passed back as it came when no candidate can take the prompt."""

    def __init__(self, attempt: Attempt, error: UpstreamStatusError, window: int | None):
        super().__init__(attempt, body=error.body, headers=error.headers)
        self.error = error
        self.window = window


def context_window_named(body: bytes) -> int | None:
    """The context window a provider's error message names, when it names one."""
    found = _WINDOW.search(body)
    if found is None:
        return None
    return int(next(g for g in found.groups() if g is not None))


SHORT_RETRY_AFTER = 2.0  # seconds: a 429 asking for no longer is worth waiting out at the same deployment
_AGAIN_STATUS = frozenset({500, 502, 503})


def worth_again(failure: Retryable, server_errors: bool) -> bool:
    """A failure a careful client retries at the same deployment before going elsewhere: a 429 whose
    Retry-After is short (the provider said when to come back), and with `server_errors` a 500, 502 or
    503 (one alone is usually transient). Not a timeout or a dropped connection (a slow or unreachable
    deployment costs as much again), nor a 429 without a wait."""
    status = failure.attempt.status
    if status == 429:
        return failure.retry_after is not None and failure.retry_after <= SHORT_RETRY_AFTER
    return server_errors and status in _AGAIN_STATUS and failure.attempt.outcome.startswith("http_")


def failed(ref: ModelRef, outcome: str, status: int | None = None, *, body: bytes | None = None) -> Retryable:
    return Retryable(Attempt(ref.provider, ref.model, outcome, status), body=body)


def status_failure(status: int, data: bytes, resp: UpstreamResponse, ref: ModelRef,
                   provider: Provider) -> Exception:
    """A provider's non-200 answer: retryable, or the client's error to pass back. A redirect is a
    failed attempt (`redirect`): it is not followed (the key would go where it points), and not passed
    back, where a client's SDK would follow it; an API endpoint that redirects is a `base_url` to fix."""
    if 300 <= status < 400:
        return Retryable(Attempt(ref.provider, ref.model, "redirect", status))
    headers = provider.redactor.headers(resp.headers)  # relayed with the error: no secret in them either
    if status in RETRYABLE_STATUS or status >= 500:
        return Retryable(Attempt(ref.provider, ref.model, f"http_{status}", status),
                         retry_after(headers), body=provider.redact(data), headers=headers)
    error = UpstreamStatusError(status, provider.redact(data), headers.get("Content-Type", "application/json"),
                                headers=headers)
    if status == 400 and _CONTEXT_400.search(data) is not None:
        return ContextTooLong(Attempt(ref.provider, ref.model, "context_length", 400), error,
                              context_window_named(data))
    return error


def answer(data: bytes, answer_key: str | None, ref: ModelRef) -> Any:
    """The parsed body when it is an answer of its endpoint; else the attempt failed (a 200 that
    carries `{"error": ...}`, or is not JSON, is never passed on as a success, nor cached)."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise failed(ref, "invalid_response", 200) from None
    if type(parsed) is not dict:
        raise failed(ref, "invalid_response", 200)
    if answer_key is not None and type(parsed.get(answer_key)) is not list:
        raise failed(ref, "error_body" if "error" in parsed else "invalid_response", 200, body=data)
    return parsed


def all_failed(name: str, attempts: list[Attempt], last: Retryable | None, breakers: BreakerBoard) -> TiergateError:
    """One error for the whole request (see the module's docstring)."""
    sent = [a for a in attempts if a.outcome not in SKIPPED]
    reasons = "; ".join(a.describe() for a in attempts) or "no candidate"
    summary = f"route {name}: every candidate failed ({reasons})"
    if not sent:
        return _none_sent(name, attempts, reasons, summary, breakers)
    decisive = sent[-1]
    if isinstance(last, ContextTooLong) and last.attempt is decisive:  # no candidate could take the prompt
        error = last.error
        error.attempts, error.ref = attempts, ModelRef(decisive.provider, decisive.model)
        return error
    if last is not None and last.attempt is decisive and decisive.status is not None and decisive.status >= 400:
        return _provider_said(decisive, last, attempts, summary)
    if decisive.outcome == "timeout":
        return UpstreamError(summary, status=504, code="upstream_timeout", attempts=attempts, tried=True)
    if decisive.outcome == "redirect":
        summary += ("; a provider's redirect is not followed (its key would go where the redirect points): "
                    "check the provider's base_url")
    return UpstreamError(summary, status=502, code="upstream_failed", attempts=attempts, tried=True)


def _none_sent(name: str, attempts: list[Attempt], reasons: str, summary: str,
               breakers: BreakerBoard) -> TiergateError:
    """Every candidate was skipped: tiergate's own queue was full, they cool down after a rate limit,
    or their breakers are open."""
    if all(a.outcome == "context_window" for a in attempts):
        return UpstreamError(f"route {name}: the prompt is longer than the context window of every candidate "
                             f"({reasons}); shorten it", status=400, code="context_length_exceeded",
                             error_type="invalid_request_error", attempts=attempts, param="messages")
    if any(a.outcome == "queue_full" for a in attempts):
        return RateLimitError(f"route {name}: every candidate is at its concurrency limit "
                              f"({reasons}); retry shortly", retry_after=1.0)
    cooling = [breakers.of(ModelRef(a.provider, a.model)).cooling() for a in attempts if a.outcome == "cooldown"]
    if cooling:
        return UpstreamError(f"route {name}: every candidate is rate-limited ({reasons})",
                             status=429, code="rate_limit_exceeded", error_type="rate_limit_error",
                             attempts=attempts, retry_after=max(0.001, min(cooling)))
    return UpstreamError(summary, status=503, code="no_provider_available", attempts=attempts)


def _provider_said(decisive: Attempt, last: Retryable, attempts: list[Attempt], summary: str) -> UpstreamError:
    """The deciding provider's own error: its status, message, code, type and headers."""
    provider_error = _error_fields(last.body)
    message = provider_error.get("message")
    limited = decisive.status == 429
    param = provider_error.get("param")
    return UpstreamError(
        f"{message} ({summary})" if isinstance(message, str) and message else summary,
        status=decisive.status, attempts=attempts, headers=last.headers, tried=True,
        retry_after=last.retry_after if limited else None,
        code=_str_or(provider_error.get("code"), "rate_limit_exceeded" if limited else "upstream_failed"),
        error_type=_str_or(provider_error.get("type"), "rate_limit_error" if limited else "upstream_error"),
        param=param if isinstance(param, str) else None)


def _error_fields(body: bytes | None) -> dict[str, Any]:
    """The provider's `{"error": {...}}` fields, when its error body has them."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {}


def _str_or(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's, more precise) or `Retry-After` (seconds or a date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
