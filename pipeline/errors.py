"""The exception tree of the pipeline.

Callers catch at the level they care about::

    PipelineError                      base of everything this package raises on purpose
    ├── UserError                      a mistake the user can fix; exit status 2, one line, no traceback
    │   ├── SpecError                  the job spec or a command-line flag is wrong
    │   ├── InputError                 a row of the input file is wrong (names file, line/row, field)
    │   └── RunStateError              the run cannot go on as asked (changed input, unknown run, ...)
    ├── StorageError                   the database or the output folder cannot be written or read
    └── RequestError                   one attempt at one request failed; carries what the audit needs
        ├── TransportError             no usable HTTP answer: connect error, timeout, reset, cut body
        ├── InvalidResponse            an HTTP 200 whose body is not a usable chat.completion
        └── HTTPStatusError            the provider answered with an error status
            ├── RateLimited            429 (carries Retry-After)
            ├── ServerError            5xx
            └── ClientError            4xx other than 429

Which of these are retried, moved to the next route or failed is not decided here: the
classification table lives in :mod:`pipeline.policy`. Foreign exceptions (httpx, aiohttp,
SQLAlchemy) are translated at the module that talks to them and chained with ``from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClientError",
    "HTTPStatusError",
    "InputError",
    "InvalidResponse",
    "PipelineError",
    "RateLimited",
    "RequestError",
    "RunStateError",
    "ServerError",
    "SpecError",
    "StorageError",
    "TransportError",
    "UserError",
]


class PipelineError(Exception):
    """Base class for every error the pipeline raises on purpose."""


class UserError(PipelineError):
    """A mistake in what the user gave us. Reported as one line; exit status 2."""

    exit_code = 2


class SpecError(UserError):
    """The job spec or a flag is invalid. ``where`` names the file and field."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class InputError(UserError):
    """A row of the input is invalid: names the file, the line or row, and the field."""

    def __init__(self, path: str, position: str, field: str | None, message: str) -> None:
        self.path = path
        self.position = position
        self.field = field
        self.message = message
        loc = f"{path}: {position}"
        if field:
            loc += f": field {field!r}"
        super().__init__(f"{loc}: {message}")


class RunStateError(UserError):
    """The run cannot proceed as asked (input changed under a resumed run, unknown run id...)."""


class StorageError(PipelineError):
    """The database or output folder failed; the run is left resumable."""

    exit_code = 1


class RequestError(PipelineError):
    """One attempt failed. Carries what the attempt record needs."""

    #: a short stable name for the attempt record's ``error_class`` column
    kind = "request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        provider_request_id: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.provider_request_id = provider_request_id
        self.body = body
        self.headers = headers or {}
        #: a parsed answer that came with the failure (e.g. finish_reason "error"), for the bill
        self.completion: Any = None
        #: the provider's x-ratelimit-* headers (a pipeline.records.RateInfo), if any
        self.rate: Any = None


class TransportError(RequestError):
    """No usable HTTP answer: connection refused or reset, timeout, body cut short."""

    kind = "transport"

    def __init__(self, message: str, *, what: str = "network", **kw: Any) -> None:
        super().__init__(message, **kw)
        #: connect | connect_timeout | read_timeout | reset | truncated | network
        self.what = what


class InvalidResponse(RequestError):
    """A 2xx answer whose body is not a usable chat.completion (bad JSON, no choices...)."""

    kind = "invalid_response"


class HTTPStatusError(RequestError):
    """The provider answered with an error status."""

    kind = "http_status"


class RateLimited(HTTPStatusError):
    """HTTP 429. ``retry_after`` holds the server's requested delay in seconds, if any."""

    kind = "rate_limited"


class ServerError(HTTPStatusError):
    """HTTP 5xx."""

    kind = "server_error"


class ClientError(HTTPStatusError):
    """HTTP 4xx other than 429."""

    kind = "client_error"
