"""Requests sent to an object store, counted where boto3 sends them: every attempt, retries and throttling.

    before = request_counts()
    ...                                    # reads, downloads, listings through shards.store
    print((request_counts() - before).line())   # "1,204 requests (1,190 GETs), 3 retries, 3 throttled answers"

Every boto3 client shards.store makes has `count_requests` hooked on botocore's `response-received` event, which
fires once per HTTP attempt, retries included, with the status code, the store's error code and the attempt
number. The counters live in shared memory made when this module is imported, so DataLoader workers forked
afterwards add to the same figures their parent reads (a process started with `spawn` counts for itself only).

Retries: listings, HEADs, puts and uploads are repeated by botocore's standard retry mode (503 Slow Down, the
throttling codes below, 5xx: exponential back-off with jitter, under a client-side retry quota); GETs are one
try each, repeated by shards.store's streams under the same bounded rule, with back-off and jitter too
(`count_retry`). Either way a store that keeps refusing ends the read with its error instead of being hammered.
DALI's reader has its own client (the AWS C++ SDK): its requests are not seen here (the profiler counts them on
a relay, tools/request_relay.py).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, fields
from typing import Any

#: Error codes that mean "slow down" (botocore's standard retry mode retries them as throttling).
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestThrottled",
})
THROTTLING_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class RequestCounts:
    """Requests counted since this module was imported (or a difference of two such readings)."""

    requests: int = 0  # HTTP requests sent, every operation, each retry counted
    gets: int = 0  # of which GetObject: object data (shard reads, downloads, indexes, manifests)
    retries: int = 0  # of which repeated an attempt that failed (throttled, 5xx, connection dropped)
    throttled: int = 0  # answers asking to slow down: 503 / 429 / SlowDown and the other THROTTLING_CODES

    def __sub__(self, other: RequestCounts) -> RequestCounts:
        return RequestCounts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def line(self) -> str:
        """One line for logs: requests, GETs, retries, throttled answers."""
        return (f"{self.requests:,} requests ({self.gets:,} GETs), {self.retries:,} retries, "
                f"{self.throttled:,} throttled answers")


_FIELDS = [f.name for f in fields(RequestCounts)]
_COUNTS = multiprocessing.RawArray("q", len(_FIELDS))  # shared with forked children (see the module docstring)
_LOCK = multiprocessing.Lock()


def request_counts() -> RequestCounts:
    """The counts so far, of this process and the children it forked after importing this module."""
    with _LOCK:
        return RequestCounts(*_COUNTS)


def _add(**amounts: int) -> None:
    with _LOCK:
        for name, amount in amounts.items():
            _COUNTS[_FIELDS.index(name)] += amount


def on_response(event_name: str = "", response_dict: dict | None = None, parsed_response: dict | None = None,
                context: dict | None = None, **_: Any) -> None:
    """botocore `response-received` handler: count one attempt (see the module docstring)."""
    status = (response_dict or {}).get("status_code")
    code = ((parsed_response or {}).get("Error") or {}).get("Code")
    attempt = ((context or {}).get("retries") or {}).get("attempt", 1)
    _add(requests=1, gets=int(event_name.endswith(".GetObject")), retries=int(attempt > 1),
         throttled=int(status in THROTTLING_STATUS or code in THROTTLING_CODES))


def count_retry() -> None:
    """A request repeated by the caller itself after a try that failed (shards.store's streams repeat their GETs,
    one try each, resuming from the byte reached): counted as a retry beside botocore's own."""
    _add(retries=1)


def count_requests(client: Any) -> Any:
    """Hook `on_response` onto a boto3 S3 client (every operation); returns the client."""
    client.meta.events.register("response-received.s3", on_response)
    return client
