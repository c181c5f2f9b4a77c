"""The request target as tiergate serves and forwards it: one canonical spelling of each path.

A provider behind tiergate (often an nginx or Envoy) resolves `..`, merges slashes and may decode
`%2e`/`%2f`, so a path that reads as `/v1/vector_stores/...` to tiergate could reach anything on the
provider's host, with tiergate's key. So every target is normalised as nginx and Envoy do
(`merge_slashes`, `normalize_path`): repeated slashes merged, `.` and `..` segments resolved, a
trailing slash dropped. What stays ambiguous is refused with a 400: percent-encoded dots and
backslashes, backslashes, control characters, a broken escape, an escaped slash that would read as a
path step (one inside a name is kept: the SDKs send `/v1/models/org%2Fmodel`), and a path that climbs
above the root or out of `/v1`. The route is chosen by the canonical path, and only it is forwarded.
"""

from __future__ import annotations

import re

from ..types import InvalidRequestError

# an escape that decodes to a dot, a backslash or a control character, or no escape at all
_AMBIGUOUS_ESCAPE = re.compile(r"%(?:2[eE]|5[cC]|[01][0-9a-fA-F]|7[fF]|(?![0-9a-fA-F]{2}))")
_ESCAPED_SLASH = re.compile(r"%2[fF]")
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def is_unusual(raw: str) -> bool:
    """Whether `raw` (a request target) may need `canonical_target`: cheap checks for the hot path,
    where the target is the canonical `/v1/chat/completions`."""
    return (raw[0] != "/" or raw[-1] == "/" or "//" in raw or "/." in raw or "%" in raw or "\\" in raw)


def refuse(raw: str, why: str) -> InvalidRequestError:
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    return InvalidRequestError(f"the request path {shown!r} is refused: {why}", code="invalid_path")


def canonical_target(raw: str) -> str | None:
    """`raw` (a request target: path and query, as sent) in its canonical form, or None when it is
    canonical already; InvalidRequestError (400) when it is ambiguous or leaves the root or `/v1`.
    An absolute-form target (`http://host/v1/...`, RFC 9112 3.2.2) is its path: tiergate is no
    forward proxy, the authority is ignored."""
    target = raw
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        target = target[absolute.end():] or "/"
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        raise refuse(raw, "it is neither an absolute path nor an absolute URL")
    if _CONTROL.search(path):
        raise refuse(raw, "it holds a backslash, a space or a control character")
    if "%" in path and _AMBIGUOUS_ESCAPE.search(path):
        raise refuse(raw, "it holds a percent-encoded dot, slash, backslash or control character, or a "
                          "broken escape; send them unencoded")
    segments: list[str] = []
    for n, segment in enumerate(path.split("/")[1:]):
        if "%" in segment and _ESCAPED_SLASH.search(segment) and _slash_is_ambiguous(n, segment):
            raise refuse(raw, "a percent-encoded slash in it would read as a path step; only a slash inside "
                              "a name (a model id `org%2Fmodel`) is taken")
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise refuse(raw, "it climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    canonical = "/" + "/".join(segments)
    if (path == "/v1" or path.startswith("/v1/")) and not (canonical == "/v1" or canonical.startswith("/v1/")):
        raise refuse(raw, "it climbs out of /v1")
    if canonical == path and absolute is None:
        return None
    return canonical + sep + query


def _slash_is_ambiguous(n: int, segment: str) -> bool:
    """An escaped slash is a name's (the SDKs send `GET /v1/models/org%2Fmodel`) unless a server that
    decodes it would see another path: in the first segment (`/v1%2F...`), or with an empty, `.` or
    `..` step on either side of it."""
    return n == 0 or any(piece in ("", ".", "..") for piece in _ESCAPED_SLASH.split(segment))
