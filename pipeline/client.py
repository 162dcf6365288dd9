"""HTTP: send one attempt to ``POST {base_url}/chat/completions`` and parse the answer.

Returns a :class:`~pipeline.records.Completion` or raises one of the
:class:`~pipeline.errors.RequestError` kinds; httpx's exceptions never leave this module.
Error bodies are read in the shapes real servers use: OpenAI and OpenRouter
(``{"error": {"message", "type", "code"}}``), vLLM (``{"object": "error", "message", ...}``),
FastAPI/LiteLLM proxies (``{"detail": ...}``) and plain text. No retries here.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from pipeline.errors import (
    ClientError,
    HTTPStatusError,
    InvalidResponse,
    RateLimited,
    RequestError,
    ServerError,
    TransportError,
)
from pipeline.records import Choice, Completion, Usage
from pipeline.spec import EndpointSpec, RetrySpec

__all__ = ["ChatClient", "parse_completion", "parse_retry_after"]

USER_AGENT = "llm-batch-pipeline/0.1"


class ChatClient:
    """Sends chat-completion requests to one endpoint."""

    def __init__(
        self,
        endpoint: EndpointSpec,
        *,
        base_url: str,
        api_key: str | None,
        retry: RetrySpec,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        self.endpoint = endpoint
        headers = {
            "user-agent": USER_AGENT,
            "content-type": "application/json",
            **dict(endpoint.headers),
        }
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._http = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(
                connect=retry.connect_timeout_s,
                read=retry.read_timeout_s,
                write=retry.read_timeout_s,
                pool=None,
            ),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def find_stored(self, metadata: Mapping[str, str]) -> Completion | None:
        """A completion stored at the provider (``store: true``) whose metadata matches, if any.

        Uses ``GET /chat/completions?metadata[k]=v``. Any failure means "not found": the
        caller then sends the request again, which is what it would do without recovery.
        """
        params = {f"metadata[{k}]": v for k, v in metadata.items()}
        params["limit"] = "1"
        try:
            response = await self._http.get(self._url, params=params)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            data = orjson.loads(response.content).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            return None
        try:
            return parse_completion(orjson.dumps(data[0]), request_id=response.headers.get("x-request-id"))
        except RequestError:
            return None

    async def complete(self, model: str, body: Mapping[str, Any]) -> tuple[Completion, int]:
        """One attempt. Returns the completion and the HTTP status, or raises RequestError."""
        payload = orjson.dumps({"model": model, **body})
        try:
            response = await self._http.post(self._url, content=payload)
        except httpx.ConnectTimeout as exc:
            raise TransportError(f"connect timeout: {exc}", what="connect_timeout") from exc
        except httpx.ConnectError as exc:
            raise TransportError(f"cannot connect: {exc}", what="connect") from exc
        except httpx.ReadTimeout as exc:
            raise TransportError("read timeout: no answer in time", what="read_timeout") from exc
        except httpx.TimeoutException as exc:
            raise TransportError(f"timeout: {exc}", what="read_timeout") from exc
        except httpx.RemoteProtocolError as exc:
            raise TransportError(str(exc), what="truncated") from exc
        except httpx.DecodingError as exc:
            raise TransportError(f"undecodable body: {exc}", what="truncated") from exc
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__, what="reset") from exc
        request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
        status = response.status_code
        if 200 <= status < 300:
            return parse_completion(response.content, request_id=request_id), status
        raise error_from_response(status, response.content, response.headers, request_id)


def parse_completion(raw: bytes, *, request_id: str | None = None) -> Completion:
    """A ``chat.completion`` body into a Completion, or InvalidResponse / an error in the body."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidResponse(
            f"invalid JSON in a 200 response: {exc}",
            provider_request_id=request_id,
            body=_snippet(raw),
        ) from None
    if not isinstance(data, dict):
        raise InvalidResponse("a 200 response that is not a JSON object", provider_request_id=request_id)
    usage = Usage.from_api(data.get("usage"))
    choices_raw = data.get("choices")
    if "error" in data and not choices_raw:
        # OpenRouter and some proxies put an upstream error in a 200 body.
        status, message, code = _error_fields(data)
        raise _status_error(status or 502, message, code, None, request_id, data)
    if not isinstance(choices_raw, list) or not choices_raw:
        raise InvalidResponse(
            "a 200 response without choices", provider_request_id=request_id, body=_snippet(raw)
        )
    choices = []
    for i, c in enumerate(choices_raw):
        if not isinstance(c, dict):
            raise InvalidResponse(f"choices[{i}] is not an object", provider_request_id=request_id)
        msg = c.get("message") or {}
        if not isinstance(msg, dict):
            raise InvalidResponse(f"choices[{i}].message is not an object", provider_request_id=request_id)
        choices.append(
            Choice(
                index=c.get("index", i) if isinstance(c.get("index", i), int) else i,
                finish_reason=c.get("finish_reason"),
                content=_text(msg.get("content")),
                reasoning=_text(msg.get("reasoning") or msg.get("reasoning_content")),
                refusal=_text(msg.get("refusal")),
                tool_calls=msg.get("tool_calls") or None,
            )
        )
    completion = Completion(
        response_id=_str(data.get("id")),
        model=_str(data.get("model")),
        provider=_str(data.get("provider")),
        system_fingerprint=_str(data.get("system_fingerprint")),
        created=data.get("created") if isinstance(data.get("created"), int) else None,
        choices=tuple(choices),
        usage=usage,
        raw=raw,
        provider_request_id=request_id,
    )
    if any(ch.finish_reason == "error" for ch in choices):
        err = InvalidResponse(
            'the provider ended the answer with finish_reason "error"',
            code="finish_reason_error",
            provider_request_id=request_id,
        )
        err.completion = completion
        raise err
    return completion


def error_from_response(
    status: int, raw: bytes, headers: Mapping[str, str], request_id: str | None
) -> HTTPStatusError:
    try:
        data: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        _, message, code = _error_fields(data)
    else:
        message, code = (_snippet(raw) or f"HTTP {status}"), None
    return _status_error(status, message, code, parse_retry_after(headers), request_id, data, dict(headers))


def _status_error(
    status: int,
    message: str,
    code: str | None,
    retry_after: float | None,
    request_id: str | None,
    body: Any,
    headers: dict[str, str] | None = None,
) -> HTTPStatusError:
    kw: dict[str, Any] = dict(
        status=status,
        code=code,
        retry_after=retry_after,
        provider_request_id=request_id,
        body=body,
        headers=headers,
    )
    text = f"HTTP {status}: {message}"
    if status == 429:
        return RateLimited(text, **kw)
    if status >= 500:
        return ServerError(text, **kw)
    return ClientError(text, **kw)


def _error_fields(data: dict[str, Any]) -> tuple[int | None, str, str | None]:
    """(status found in the body, message, code) from the error shapes servers use."""
    err = data.get("error")
    status: int | None = None
    if isinstance(err, dict):
        message = err.get("message") or err.get("msg") or orjson.dumps(err).decode()
        code_raw = err.get("code") if err.get("code") is not None else err.get("type")
        if isinstance(err.get("code"), int):
            status = err["code"]
            code_raw = err.get("type") or _meta_code(err)
    elif isinstance(err, str):
        message, code_raw = err, data.get("code") or data.get("type")
    elif "detail" in data:
        detail = data["detail"]
        message, code_raw = (
            (detail if isinstance(detail, str) else orjson.dumps(detail).decode()),
            None,
        )
    else:
        message = data.get("message") or orjson.dumps(data).decode()
        code_raw = data.get("code") if not isinstance(data.get("code"), int) else data.get("type")
    return status, str(message)[:2000], None if code_raw is None else str(code_raw)


def _meta_code(err: dict[str, Any]) -> str | None:
    meta = err.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("error_type"), str):
        return str(meta["error_type"])
    return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return orjson.dumps(v).decode()


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _snippet(raw: bytes, limit: int = 300) -> str:
    return raw[:limit].decode("utf-8", "replace")
