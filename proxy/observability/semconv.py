"""The OpenTelemetry GenAI semantic conventions tiergate follows, by version: attribute and metric names.

The conventions live in `open-telemetry/semantic-conventions-genai` (schema `gen-ai/1.42.0`:
`docs/gen-ai/client-inference.md`, `gen-ai-token-metrics.md`). The previous names are those of
semantic-conventions v1.41.0, the last release that held the GenAI conventions, as that
repository's migration guide lists them; `TIERGATE_GENAI_SEMCONV` picks one set, or both
(`1.41/dup`) while dashboards and backends move over.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import ConfigError

LATEST = "1.42"
PREVIOUS = "1.41"
CHOICES = (LATEST, PREVIOUS, f"{PREVIOUS}/dup")

# inference operations (the conventions' `gen_ai.client.inference` span and metrics); embeddings
# have their own conventions and are traced but not counted in the inference metrics
INFERENCE_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
OPERATION_OF_ENDPOINT = {"chat.completions": "chat", "completions": "text_completion",
                         "embeddings": "embeddings", "responses": "chat"}

# time buckets both versions recommend for the duration and time-to-first-chunk histograms (s)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# the time-per-output-chunk histogram's (s)
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


@dataclass(frozen=True, slots=True)
class GenAINames:
    """The names one version of the conventions gives what tiergate reports."""

    version: str
    schema_url: str
    cache_write_attribute: str  # span attribute: input tokens written to the provider's cache
    duration: str  # histogram, s
    time_to_first_chunk: str  # histogram, s (streams)
    time_per_output_chunk: str  # histogram, s (streams)
    # token counters (latest) by what they count; empty in the previous version, which has one
    # histogram (`token_usage`) with a `gen_ai.token.type` attribute instead
    usage_counters: tuple[tuple[str, str], ...]
    token_usage: str | None


NAMES = {
    LATEST: GenAINames(
        LATEST, "https://opentelemetry.io/schemas/gen-ai/1.42.0", "gen_ai.usage.cache_write.input_tokens",
        "gen_ai.client.inference.duration", "gen_ai.client.inference.time_to_first_chunk",
        "gen_ai.client.inference.time_per_output_chunk",
        (("input", "gen_ai.client.inference.usage.input_tokens"),
         ("output", "gen_ai.client.inference.usage.output_tokens"),
         ("cache_read", "gen_ai.client.inference.usage.cache_read.input_tokens"),
         ("cache_write", "gen_ai.client.inference.usage.cache_write.input_tokens"),
         ("reasoning", "gen_ai.client.inference.usage.reasoning.output_tokens")),
        None),
    PREVIOUS: GenAINames(
        PREVIOUS, "https://opentelemetry.io/schemas/1.41.0", "gen_ai.usage.cache_creation.input_tokens",
        "gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.client.operation.time_per_output_chunk", (), "gen_ai.client.token.usage"),
}


def names_for(choice: str) -> tuple[GenAINames, ...]:
    """The name sets a `TIERGATE_GENAI_SEMCONV` value asks for (the first one names the spans' schema)."""
    value = (choice or LATEST).strip().lower()
    if value == LATEST:
        return (NAMES[LATEST],)
    if value == PREVIOUS:
        return (NAMES[PREVIOUS],)
    if value == f"{PREVIOUS}/dup":
        return (NAMES[LATEST], NAMES[PREVIOUS])
    raise ConfigError(f"genai_semconv = {choice!r}: expected one of {', '.join(CHOICES)}", param="genai_semconv")


def prometheus_name(name: str, unit: str, counter: bool = False) -> str:
    """The Prometheus name of an OpenTelemetry metric, as OpenTelemetry's Prometheus exporters write it:
    dots to underscores, the unit as a suffix (`s` -> `_seconds`; annotations like `{token}` dropped),
    `_total` on counters (prometheus-client adds that itself)."""
    out = name.replace(".", "_")
    if unit == "s" and not out.endswith("_seconds"):
        out += "_seconds"
    return out + "_total" if counter else out


def label_name(attribute: str) -> str:
    """A metric attribute as a Prometheus label."""
    return attribute.replace(".", "_")
