"""Helpers for the observability tests: run tiergate with chosen settings and environment, parse /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict

from .conftest import production_runner

PRICING = {"primary/model-a": {"input": 1.0, "output": 2.0}, "backup/model-b": {"input": 0.5, "output": 1.5}}


def config_with(environ: Mapping[str, str] | None = None, **overrides: Any) -> RouterConfig:
    base = {"timeout": 5.0, "retry_backoff": 0.001, "retry_after_cap": 0.05, "enable_monitoring": True}
    base.update(overrides)
    return RouterConfig.load(environ=dict(environ or {}), dotenv_path=None, overrides=base)


@asynccontextmanager
async def running(doc: dict[str, Any], config: RouterConfig, *, tracer_provider: Any = None
                  ) -> AsyncIterator[tuple[str, Router]]:
    """tiergate on a loopback port; yields (base url, router); cleans up (and flushes telemetry) on exit."""
    router = Router(config, table=table_from_dict(doc, source="test"), tracer_provider=tracer_provider)
    runner = production_runner(router)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", router
    finally:
        await runner.cleanup()


def parse_metrics(text: str) -> dict[str, list[Any]]:
    """Samples by sample name (`tiergate_requests_total`, `..._bucket`, ...)."""
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for s in samples.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


async def requests_counted(running: Any, n: int, timeout: float = 10.0) -> dict[str, float]:
    """`tiergate_requests_total` of a `start_tiergate` instance by status, once `n` requests have been counted."""

    def statuses() -> dict[str, float]:
        found: dict[str, float] = {}
        for sample in parse_metrics(running.router.telemetry.render_metrics()[0].decode()).get(
                "tiergate_requests_total", []):
            found[sample.labels["status"]] = found.get(sample.labels["status"], 0) + sample.value
        return found

    async with asyncio.timeout(timeout):
        while sum(statuses().values()) < n:
            await asyncio.sleep(0.01)
    return statuses()
