"""tiergate's errors as HTTP answers in an ASGI application (FastAPI, Starlette).

    app.add_exception_handler(TiergateError, fastapi_exception_handler)

A `TiergateError` raised in an endpoint then answers with its OpenAI error body and status (502
when every upstream failed, 429 with `Retry-After`, ...) instead of the framework's plain 500.
Starlette is imported only when the handler runs: it is the application's dependency, not tiergate's.
"""

from __future__ import annotations

import math
from typing import Any

from ..types import TiergateError


async def fastapi_exception_handler(request: Any, exc: Exception) -> Any:
    """A Starlette/FastAPI exception handler for `TiergateError` (and its subclasses)."""
    from starlette.responses import Response

    if not isinstance(exc, TiergateError):
        raise exc
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, (int, float)):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return Response(exc.to_body(), status_code=exc.status, headers=headers,
                    media_type=getattr(exc, "content_type", "application/json"))
