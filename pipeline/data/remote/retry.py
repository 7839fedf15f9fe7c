"""Retries for object storage: transient errors again with backoff and full jitter, others at once.

    from pipeline.data.remote.retry import RetryPolicy
    policy = RetryPolicy(give_up_after_s=120)
    data = policy.call(lambda: client.get_object(...), what="GET s3://bucket/key")

Transient (``is_transient``): connection refused/reset/aborted, timeouts (connect and read), a body cut
short, HTTP 5xx, 429 and S3's throttling codes (SlowDown, RequestTimeout, ...). Everything else -- a
missing bucket or key, denied credentials, a failed precondition -- is raised at once: retrying would
only delay the error the user must act on.

Backoff is exponential with full jitter (AWS's "Exponential Backoff And Jitter"): before attempt n+1 the
caller sleeps ``uniform(0, min(cap_s, base_s * 2**n))``, which spreads many clients (DataLoader workers,
torchrun ranks, a fleet) that lost the same server instead of sending them back together. The budget is
time, not a count: an operation is given up once it has been failing for ``give_up_after_s`` without
progress (a ranged read that moves forward between failures resets the clock through ``progress()``),
so "the server is away for N seconds" has one setting whatever the backoff does. The client library's
own retries are off (store.py): this is the one retry policy, and the one place its budget is set.

A policy is immutable and shared; each ``call`` (or ``attempts()`` loop) keeps its own state.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# S3 error codes that mean "later", whatever the HTTP status says
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "ConditionalRequestConflict",  # S3: a concurrent conditional write is in flight; retry
        "BadDigest",  # the body was damaged on the way; sending it again is the fix
        "IncompleteBody",
    }
)
# botocore exceptions (by class name, so this module needs no client library) that are network faults
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "HTTPClientError",
        "ProtocolError",  # urllib3: connection broken mid-response
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)


def http_status(err: BaseException) -> int | None:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def error_code(err: BaseException) -> str | None:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_transient(err: BaseException) -> bool:
    """True for a fault that another attempt may not meet (network, timeout, 5xx, throttling)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the cause chain: a library may wrap the socket error
        seen.add(id(err))
        code, status = error_code(err), http_status(err)
        if code is not None or status is not None:  # an answer from the server: judge it by its status
            return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(err).__mro__):
            return True
        if isinstance(err, (socket.timeout, TimeoutError, http.client.IncompleteRead)):
            return True
        if isinstance(err, (ConnectionError, http.client.RemoteDisconnected)):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """``give_up_after_s``: how long an operation may keep failing (without progress) before its last
    error is raised; ``base_s``/``cap_s``: the backoff's first and largest ceiling."""

    give_up_after_s: float = 120.0
    base_s: float = 0.1
    cap_s: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.give_up_after_s >= 0:
            raise ValueError(f"give_up_after_s={self.give_up_after_s!r}: must be >= 0 seconds")
        if not (self.base_s > 0 and self.cap_s >= self.base_s):
            raise ValueError(f"base_s={self.base_s!r}, cap_s={self.cap_s!r}: need 0 < base_s <= cap_s")

    def delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(failures-1))]."""
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** min(failures - 1, 60)))

    def attempts(self, what: str) -> Iterator[Attempt]:
        """``for attempt in policy.attempts(what): with attempt: ...`` -- the loop ends after the first
        attempt whose block raises nothing; a transient error is swallowed (and waited out) until the
        budget is spent, then re-raised wrapped in ``Exhausted``; any other error propagates at once."""
        state = _State(self, what)
        while not state.done:
            yield Attempt(state)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried on transient errors (see ``attempts``)."""
        for attempt in self.attempts(what):
            with attempt:
                result = fn()
        return result


class Exhausted(Exception):
    """A transient error that outlasted the retry budget; ``__cause__`` is the last error."""

    def __init__(self, what: str, attempts: int, seconds: float, last: BaseException) -> None:
        self.what, self.attempts, self.seconds, self.last = what, attempts, seconds, last
        first = str(last).splitlines()[0][:300] if str(last) else ""
        super().__init__(
            f"{what}: still failing after {attempts} attempts over {seconds:.1f} s "
            f"(last: {type(last).__name__}: {first})"
        )


class _State:
    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy, self.what = policy, what
        self.done = False
        self.failures = 0  # in the current streak (since the last progress)
        self.attempts = 0
        self.streak_start: float | None = None


class Attempt:
    """One try; ``progress()`` inside it says the operation moved forward (a streak of failures ends)."""

    def __init__(self, state: _State) -> None:
        self._s = state

    def progress(self) -> None:
        self._s.failures = 0
        self._s.streak_start = None

    def __enter__(self) -> Attempt:
        self._s.attempts += 1
        return self

    def __exit__(self, kind, err, tb) -> bool:
        s = self._s
        if err is None:
            s.done = True
            return False
        if not isinstance(err, Exception) or not is_transient(err):
            return False  # raised at once
        now = time.monotonic()
        if s.streak_start is None:
            s.streak_start = now
        s.failures += 1
        elapsed = now - s.streak_start
        wait = s.policy.delay(s.failures)
        if elapsed + wait > s.policy.give_up_after_s:
            raise Exhausted(s.what, s.attempts, elapsed, err) from err
        log.debug("%s: %s (attempt %d); retrying in %.2f s", s.what, type(err).__name__, s.attempts, wait)
        if s.failures == 1 or s.failures % 10 == 0:
            log.info(
                "%s: transient %s, retrying (%.0f s of %.0f s budget used)",
                s.what,
                type(err).__name__,
                elapsed,
                s.policy.give_up_after_s,
            )
        s.policy.sleep(wait)
        return True
