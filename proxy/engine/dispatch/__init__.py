"""The attempt loop and its parts: the call it carries, the gate, one attempt's lifetime, the hedge,
failure classification, the stream relay, and the signals observers subscribe to."""

from .call import Call, StreamContinuer
from .classify import RETRYABLE_STATUS, retry_after
from .events import AttemptEvents, AttemptObserver, CooldownStarted
from .loop import AttemptLoop
from .relay import stream_error_event

__all__ = ["RETRYABLE_STATUS", "AttemptEvents", "AttemptLoop", "AttemptObserver", "Call", "CooldownStarted",
           "StreamContinuer", "retry_after", "stream_error_event"]
