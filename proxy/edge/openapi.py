"""`GET /openapi.json`: an OpenAPI 3.0 description of tiergate's own endpoints.

Built once at import and served as pre-serialised bytes. Request bodies are described as far as
tiergate checks them; every other field goes upstream untouched (`additionalProperties: true`).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .. import __version__
from ..types import ModelTier, UseCase

_ERROR = {"$ref": "#/components/schemas/Error"}
_JSON_OBJECT = {"type": "object", "additionalProperties": True}
_ROUTE_HEADERS = [
    {"name": "X-Use-Case", "in": "header", "required": False,
     "schema": {"type": "string", "enum": [u.value for u in UseCase]}},
    {"name": "X-Model-Tier", "in": "header", "required": False,
     "schema": {"type": "string", "enum": [t.value for t in ModelTier]}},
    {"name": "x-tiergate-timeout", "in": "header", "required": False,
     "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 600}},
]


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "invalid request", 401: "missing or invalid bearer key", 404: "unknown model or path",
               408: "request body too slow", 413: "request body too large",
               429: "tiergate's per-provider limit is full (Retry-After)",
               502: "every candidate failed", 503: "no provider available", 504: "upstream timeout"}
    return {str(s): {"description": reasons[s], "content": {"application/json": {"schema": _ERROR}}}
            for s in statuses}


def _forwarded(summary: str, schema: dict[str, Any], streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _JSON_OBJECT}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "summary": summary,
        "parameters": _ROUTE_HEADERS,
        "security": [{"bearerAuth": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "the upstream answer, passed back unchanged but for `model`",
                              "content": content},
                      **_errors(400, 401, 408, 413, 429, 502, 503, 504)},
    }}


def _get(summary: str, schema: dict[str, Any], *, auth: bool = False, content_type: str = "application/json",
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {"200": {"description": "OK", "content": {content_type: {"schema": schema}}},
                                        **(extra or {})}}
    if auth:
        op["security"] = [{"bearerAuth": []}, {}]
        op["responses"].update(_errors(401))
    return {"get": op}


_MESSAGE = {"type": "object", "required": ["role"], "additionalProperties": True,
            "properties": {"role": {"type": "string"}, "content": {"type": "string", "nullable": True}}}
_COMMON = {"model": {"type": "string"}, "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
           "top_p": {"type": "number"}, "n": {"type": "integer"}, "user": {"type": "string"},
           "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}


_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"type": "string", "enum": ["error"]},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}
_MESSAGES_BODY = {"type": "object", "required": ["messages"], "additionalProperties": True,
                  "properties": {"model": {"type": "string"}, "max_tokens": {"type": "integer"},
                                 "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _JSON_OBJECT}]},
                                 "messages": {"type": "array", "minItems": 1, "items": {
                                     "type": "object", "required": ["role", "content"], "properties": {
                                         "role": {"type": "string", "enum": ["user", "assistant"]},
                                         "content": {"type": "string"}}}},
                                 "stream": {"type": "boolean"}, "temperature": {"type": "number"}}}


def _messages(summary: str, streams: bool) -> dict[str, Any]:
    """An Anthropic Messages operation: its errors in Anthropic's shape."""
    op = _forwarded(summary, _MESSAGES_BODY, streams)
    for status, response in op["post"]["responses"].items():
        if status != "200":
            response["content"] = {"application/json": {"schema": _ANTHROPIC_ERROR}}
    op["post"]["parameters"] = [*_ROUTE_HEADERS, {"name": "anthropic-version", "in": "header", "required": False,
                                                  "schema": {"type": "string"}}]
    return op


def _stored(method: str, summary: str) -> dict[str, Any]:
    return {method: {
        "summary": summary, "parameters": [_RESPONSE_ID], "security": [{"bearerAuth": []}, {}],
        "responses": {"200": {"description": "the holder's answer, passed back unchanged",
                              "content": {"application/json": {"schema": _JSON_OBJECT}}},
                      **_errors(401, 404, 502, 504)}}}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "tiergate", "version": __version__,
             "description": "OpenAI-compatible LLM routing sidecar. Route by X-Use-Case / X-Model-Tier "
                            "headers or by `model` (`use_case:tier`, an alias, or `provider/model`). Every "
                            "other `/v1/*` path (moderations, images, audio, files, uploads, batches, "
                            "vector_stores, ...) is passed through to the routing table's `passthrough_provider` "
                            "(or `passthrough_paths`), bodies streamed both ways; without one it is a 404."},
    "paths": {
        "/v1/chat/completions": {**_forwarded("Chat completion (streamed with `stream: true`)", {
            "type": "object", "required": ["messages"], "additionalProperties": True,
            "properties": {**_COMMON, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
                           "stream": {"type": "boolean"}}}, True),
            "get": {"summary": "The chat answers kept with `store: true`: from the provider a `model` naming a "
                               "route points to, else the pass-through provider (with inbound keys: the key's "
                               "own, in pages of their own)",
                    "parameters": [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                                   for name, kind in (("model", "string"), ("after", "string"),
                                                      ("limit", "integer"), ("order", "string"))],
                    "security": [{"bearerAuth": []}, {}],
                    "responses": {"200": {"description": "the provider's list (filtered to the key's answers)",
                                          "content": {"application/json": {"schema": _JSON_OBJECT}}},
                                  **_errors(401, 404, 502, 504)}}},
        "/v1/completions": _forwarded("Text completion", {
            "type": "object", "required": ["prompt"], "additionalProperties": True,
            "properties": {**_COMMON, "prompt": _TEXTS, "stream": {"type": "boolean"}}}, True),
        "/v1/embeddings": _forwarded("Embeddings", {
            "type": "object", "required": ["input"], "additionalProperties": True,
            "properties": {"model": {"type": "string"}, "input": _TEXTS,
                           "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                           "dimensions": {"type": "integer"}}}, False),
        "/v1/responses": _forwarded(
            "Responses API call (streamed as typed events with `stream: true`); translated to chat for "
            "providers that serve only Chat Completions", {
                "type": "object", "additionalProperties": True,
                "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"},
                               "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": _JSON_OBJECT}]},
                               "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer"},
                               "previous_response_id": {"type": "string"}, "temperature": {"type": "number"},
                               "tools": {"type": "array", "items": _JSON_OBJECT}, "text": _JSON_OBJECT,
                               "reasoning": _JSON_OBJECT, "store": {"type": "boolean"}}}, True),
        "/v1/messages": _messages("Anthropic Messages call (streamed as Messages' events with `stream: true`); "
                                  "native to `kind: anthropic` providers, translated to chat for the others", True),
        "/v1/messages/count_tokens": _messages("Anthropic token count, by the route's Messages provider", False),
        "/v1/responses/{response_id}": {
            **_stored("get", "A stored response, from the provider that holds it"),
            **_stored("delete", "Delete a stored response at the provider that holds it")},
        "/v1/responses/{response_id}/cancel": _stored("post", "Cancel a background response at its provider"),
        "/v1/responses/{response_id}/input_items": _stored("get", "A stored response's input items"),
        "/v1/models/{model}": {"get": {
            "summary": "One model: tiergate's own ids (routes, aliases, models) here, any other passed through",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "security": [{"bearerAuth": []}, {}],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": _JSON_OBJECT}}},
                          **_errors(401, 404, 502)}}},
        "/v1/models": _get("Routes, aliases and concrete models", {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": _JSON_OBJECT}}},
            auth=True),
        "/health": _get("Liveness", {"type": "object", "properties": {"status": {"type": "string"}}}),
        "/ready": _get("Readiness (503 while starting or draining)",
                       {"type": "object", "properties": {"ready": {"type": "boolean"},
                                                         "draining": {"type": "boolean"}}},
                       extra={"503": {"description": "not ready", "content": {"application/json": {
                           "schema": _JSON_OBJECT}}}}),
        "/health/details": _get("Providers, circuit breakers, routing table source and age", _JSON_OBJECT),
        "/metrics": _get("Prometheus metrics", {"type": "string"}, content_type="text/plain", auth=True),
        "/openapi.json": _get("This document", _JSON_OBJECT),
    },
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "required on /v1/* and /metrics when TIERGATE_API_KEYS is "
                                                          "set (/metrics: unless TIERGATE_METRICS_AUTH=open)"}},
        "schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": "string", "nullable": True},
                               "code": {"type": "string", "nullable": True}}}}}},
    },
}
_BODY = orjson.dumps(SPEC)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
