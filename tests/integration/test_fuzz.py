"""Fuzzing over real HTTP against a running `tiergate serve --demo`: no 5xx, no hang, no crash.

Two bounded runs (derandomized, a few seconds each): hypothesis drives raw requests (methods,
paths, headers, encodings, bodies of any shape and size) through `http.client`; schemathesis
generates requests from tiergate's own `/openapi.json`.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.adapters import FIELD_TYPES
from proxy.edge.openapi import SPEC

from .test_cli import ENV, free_port

MAX_BODY = 64 * 1024
FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))  # bounded per test by max_examples


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {**ENV, "PYTHONPATH": os.getcwd(), "TIERGATE_MAX_BODY_BYTES": str(MAX_BODY),
           "TIERGATE_CLIENT_BODY_TIMEOUT": "2", "ENABLE_MONITORING": "false"}
    workdir = tmp_path_factory.mktemp("fuzz")
    log_path = workdir / "stderr.log"  # a file, not a pipe: a full pipe would block the server
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port)],
                                env=env, cwd=str(workdir), stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, "tiergate exited at start-up"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, "tiergate did not come up"
            time.sleep(0.05)
    yield url
    alive = proc.poll() is None
    proc.terminate()
    proc.wait(timeout=30)
    stderr = log_path.read_text(errors="replace")
    assert alive, f"tiergate crashed during the fuzz run:\n{stderr[-5000:]}"
    assert "unexpected error" not in stderr, stderr[-5000:]  # tiergate's own 500 path


# -- hypothesis: raw requests ----------------------------------------------------------------

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/ready",
         "/health/details", "/openapi.json", "/v1/", "/", "/v1/chat/completions/", "//v1/models?x=%ff",
         "/v1/responses", "/v1/responses", "/v1/responses/resp_1", "/v1/responses/resp_1/cancel",
         "/v1/responses/resp_1/input_items?limit=2", "/v1/models/general_purpose", "/v1/models/x%2Fy",
         "/v1/moderations", "/v1/audio/speech", "/v1/files?purpose=batch"]
header_bytes = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)
    .map(lambda s: s.encode("latin-1")),
    st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30).map(str.encode),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | st.integers(),
                                 "content": json_values})
request_object = st.dictionaries(
    st.sampled_from(sorted(FIELD_TYPES)) | st.text(max_size=12),
    json_values | st.lists(message, max_size=3), max_size=6)
chat_object = st.builds(lambda extra, msgs: {**extra, "messages": msgs}, request_object,
                        st.lists(message, min_size=0, max_size=3))
input_item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference",
                             "web_search_call"]) | json_values,
    "role": st.sampled_from(["user", "assistant", "developer", "tool"]) | json_values,
    "content": json_values | st.lists(st.fixed_dictionaries({"type": st.sampled_from(
        ["input_text", "input_image", "input_file", "output_text"]) | json_values, "text": json_values}), max_size=2),
    "call_id": json_values, "name": json_values, "arguments": json_values, "output": json_values})
responses_object = st.builds(lambda extra, items: {**extra, "input": items}, request_object,
                             st.text(max_size=20) | st.lists(input_item, max_size=3) | json_values)


def _encode(obj: Any, encoding: str) -> bytes:
    text = json.dumps(obj, ensure_ascii=False)  # the stdlib: integers of any size, as a client may send
    return text.encode(encoding, "surrogatepass") if encoding != "utf-8" else text.encode()


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=512),
    st.builds(_encode, request_object | chat_object | responses_object | json_values,
              st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig"])),
    st.builds(lambda n, c: c * n, st.sampled_from([MAX_BODY - 10, MAX_BODY + 1, 2 * MAX_BODY]),
              st.sampled_from([b" ", b"{", b"\xff"])),
)
headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Content-Encoding", "X-Use-Case", "X-Model-Tier", "x-tiergate-timeout",
                     "Authorization", "x-request-id", "traceparent", "tracestate", "Accept", "Expect"]),
    st.sampled_from([b"application/json", b"text/plain", b"application/json; charset=utf-16", b"gzip",
                     b"deflate", b"br", b"identity", b"code_generation", b"PREMIUM", b"0", b"-1", b"1e309",
                     b"nan", b"100-continue", b"Bearer x"]) | header_bytes,
    max_size=5)


@settings(FUZZ_SETTINGS, max_examples=250)
@given(method=st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
       path=st.sampled_from(PATHS), headers=headers, body=bodies, chunked=st.booleans())
def test_raw_requests_never_get_a_5xx(demo_server: str, method: str, path: str, headers: dict[str, bytes],
                                      body: bytes, chunked: bool) -> None:
    host, port = demo_server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if chunked and body:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        else:
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()
    except (BrokenPipeError, ConnectionResetError):
        return  # the server refused an oversized body before reading it: a 413 and a close
    finally:
        conn.close()
    sent = (method, path, headers, body[:200], chunked)
    assert response.status < 500, (response.status, data[:500], sent)
    if path.startswith("/v1/") and 400 <= response.status != 400 and method != "HEAD":
        # tiergate's own errors are OpenAI-shaped; a bare 400 may come from aiohttp's HTTP parser
        assert data.startswith(b'{"error":{'), (response.status, data, sent)


# -- schemathesis: requests generated from /openapi.json -------------------------------------

schema = schemathesis.openapi.from_dict(SPEC)


@schema.parametrize()
@settings(FUZZ_SETTINGS, max_examples=12)
def test_openapi_operations_never_get_a_5xx(case: Any, demo_server: str) -> None:
    response = case.call(base_url=demo_server, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])


def test_a_list_at_a_provider_without_http_is_a_404_not_a_5xx(demo_server: str) -> None:
    """The demo's route goes to a mock provider: a stored-chat list by that route has nowhere to go."""
    host, port = demo_server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/v1/chat/completions?model=general_purpose")
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 404 and answer["error"]["code"] == "not_found", answer
