"""URLs in tiergate's own words: credentials masked wherever a URL is quoted, and checks of the
URLs a user configures (provider `base_url`, `DATABASE_URL`, `TIERGATE_REDIS_URL`).

Every message, log line, health field or CLI output that quotes a URL passes it (or the text
holding it) through `redact_credentials` first, so a `user:password@` never leaves the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

# scheme://userinfo@ -- userinfo is `user`, `user:password` or `:password`; it ends at the last `@`
# before the host (a password may hold `@`), and never spans `/`, whitespace or quotes
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s'\"<>]*)@")


def redact_credentials(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host` anywhere in `text`; a user
    alone (which may itself be a token, `https://sk-123@host`) becomes `***@`."""
    if "@" not in text:  # the common case: no URL with credentials, nothing to scan
        return text
    return _USERINFO.sub(_mask, text)


def _mask(match: re.Match[str]) -> str:
    user, sep, _ = match.group("userinfo").partition(":")
    shown = f"{user}:***" if sep and user else "***"
    return f"{match.group('scheme')}{shown}@"


def parse_url(url: str, *, name: str, schemes: Iterable[str], credentials: bool) -> SplitResult:
    """Split `url` and check its scheme, host and port; ValueError says what is wrong, naming
    `name` and quoting the URL with its credentials masked. `credentials=False` rejects `user:pass@`."""
    allowed = tuple(schemes)
    shown = redact_credentials(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"{name}: {shown!r} is not a valid URL ({exc})") from None
    if parts.scheme not in allowed:
        raise ValueError(f"{name}: {shown!r} is not a URL starting with {' or '.join(s + '://' for s in allowed)}")
    if not parts.hostname and not credentials:  # DSNs may name a socket directory in the query instead
        raise ValueError(f"{name}: {shown!r} has no host")
    if not credentials and (parts.username is not None or parts.password is not None):
        raise ValueError(f"{name}: {shown!r} holds credentials (user:password@); they are not sent "
                         "from here: give the key as api_key or api_key_env (or a header in headers)")
    return parts
