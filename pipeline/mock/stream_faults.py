"""How the mock provider streams: chunk size, pacing, and faults in the middle of a stream.

:class:`StreamFaults` is :attr:`MockConfig.streaming <pipeline.mock.server.MockConfig>`. The
server's ``_stream`` hands the prepared response to :func:`send`, which writes the
``chat.completion.chunk`` events (the same shape as before: a role delta, reasoning, content
or tool-call argument deltas of ``chunk_chars`` characters, a finish delta, then the usage
chunk when ``stream_options.include_usage`` asks for it, then ``data: [DONE]``).

Knobs:

* ``chunk_chars``: characters per content / reasoning / arguments delta (default 16);
* ``chunk_delay_ms``: pause between events (0: the whole stream goes out in one write);
* ``comments``: an SSE comment before the stream and inside every event, as OpenRouter's
  ``: OPENROUTER PROCESSING`` keep-alives (a client must skip them).

Faults, after ``K`` events (the role delta counts as one; at most one of these):

* ``cut_after``: close the connection without ending the chunked body (a cut);
* ``error_after``: send an error event (``{"error": {"code": error_status, ...}}``, with
  ``finish_reason: "error"``, as OpenRouter does with HTTP 200), then end the stream;
* ``stall_after``: send nothing more, for ``stall_s`` or until the client goes away;
* ``end_after``: end the body cleanly there, without ``[DONE]`` (a stream that stops short);

and, on their own or with one of the above:

* ``no_usage``: leave the usage chunk out even when it was asked for;
* ``no_done``: leave ``data: [DONE]`` out.

``first`` limits the faults to the first N sightings of each distinct request body (0: every
request), so a retry of the same request streams cleanly. That memory lives in this object,
for the life of the config (``MockServer.reset`` does not clear it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from aiohttp import web

    from pipeline.mock.server import MockConfig, _Answer, _Chat, _Choice, _Plan

__all__ = ["StreamFaults", "render", "send"]

_DONE = b"data: [DONE]\n\n"
_COMMENT = b": mock keep-alive\n"
_POLL_S = 0.05


@dataclass(frozen=True)
class StreamFaults:
    """Streaming knobs and mid-stream faults (see the module's documentation)."""

    chunk_chars: int = 16
    chunk_delay_ms: float = 0.0
    comments: bool = False
    cut_after: int | None = None
    error_after: int | None = None
    error_status: int = 502
    stall_after: int | None = None
    stall_s: float = 300.0
    end_after: int | None = None
    no_usage: bool = False
    no_done: bool = False
    first: int = 0
    _seen: dict[bytes, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be >= 1")
        if self.chunk_delay_ms < 0 or self.stall_s < 0:
            raise ValueError("chunk_delay_ms and stall_s must be >= 0")
        marks = (self.cut_after, self.error_after, self.stall_after, self.end_after)
        stops = [k for k in marks if k is not None]
        if len(stops) > 1:
            raise ValueError("set at most one of cut_after, error_after, stall_after, end_after")
        if any(k < 0 for k in stops) or self.first < 0:
            raise ValueError("event counts and first must be >= 0")
        if not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP error status")

    @property
    def stop_after(self) -> int | None:
        for k in (self.cut_after, self.error_after, self.stall_after, self.end_after):
            if k is not None:
                return k
        return None

    @property
    def has_faults(self) -> bool:
        return self.stop_after is not None or self.no_usage or self.no_done

    def applies(self, body: Mapping[str, Any]) -> bool:
        """Do the faults apply to this request? (Counts sightings when ``first`` is set.)"""
        if not self.has_faults:
            return False
        if self.first <= 0:
            return True
        key = hashlib.blake2b(orjson.dumps(body), digest_size=16).digest()
        seen = self._seen.get(key, 0)
        if seen >= self.first:
            return False
        self._seen[key] = seen + 1
        return True


# --------------------------------------------------------------------------- rendering


def render(answer: _Answer, plan: _Plan, usage: dict[str, Any] | None, chunk_chars: int) -> list[bytes]:
    """The ``data:`` events of a streamed answer, ``[DONE]`` excluded; the usage chunk (when
    ``usage`` is given) last.

    Byte for byte ``orjson.dumps({**head, "choices": [entry], **tail})`` per event, built
    around one serialised prefix so that only the delta is serialised per event.
    """
    head: dict[str, Any] = {
        "id": answer.id,
        "object": "chat.completion.chunk",
        "created": answer.created,
        "model": answer.model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    opening = b"data: " + orjson.dumps(head)[:-1]
    tail = b',"usage":null}\n\n' if usage is not None else b"}\n\n"
    go_on = b',"logprobs":null,"finish_reason":null}]' + tail
    events = []
    for index, choice in enumerate(plan.choices):
        start = opening + b',"choices":[{"index":' + str(index).encode() + b',"delta":'
        for delta, finish in _deltas(choice, answer.call_ids[index], chunk_chars):
            if finish is None:
                events.append(start + orjson.dumps(delta) + go_on)
            else:
                end = b',"logprobs":null,"finish_reason":' + orjson.dumps(finish) + b"}]" + tail
                events.append(start + orjson.dumps(delta) + end)
    if usage is not None:
        events.append(_event({**head, "choices": [], "usage": usage}))
    return events


def _event(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _deltas(choice: _Choice, call_id: str, size: int) -> list[tuple[dict[str, Any], str | None]]:
    out: list[tuple[dict[str, Any], str | None]] = []
    if choice.tool_name is not None:
        function = {"name": choice.tool_name, "arguments": ""}
        call = {"index": 0, "id": call_id, "type": "function", "function": function}
        out.append(({"role": "assistant", "content": None, "tool_calls": [call]}, None))
    else:
        out.append(({"role": "assistant", "content": ""}, None))
    out += [({"content": "", "reasoning": p}, None) for p in _pieces(choice.reasoning or "", size)]
    if choice.tool_name is not None:
        out += [
            ({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, None)
            for p in _pieces(choice.arguments or "", size)
        ]
    else:
        out += [({"content": p}, None) for p in _pieces(choice.content or "", size)]
    out.append(({}, choice.finish_reason))
    return out


def _pieces(text: str, size: int) -> list[str]:
    return [text[start : start + size] for start in range(0, len(text), size)]


def _error_event(answer: _Answer, status: int) -> bytes:
    """A mid-stream error as OpenRouter sends it: HTTP 200 already went out, so the error
    travels as a data event, with the choice ended by ``finish_reason: "error"``."""
    return _event(
        {
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": answer.model,
            "provider": "mock",
            "error": {
                "code": status,
                "message": f"Injected failure in the middle of the stream (error {status}).",
                "metadata": {"error_type": "provider_error"},
            },
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
    )


# --------------------------------------------------------------------------- sending


async def send(
    request: web.BaseRequest,
    response: web.StreamResponse,
    chat: _Chat,
    plan: _Plan,
    answer: _Answer,
    config: MockConfig,
) -> None:
    """Write the stream of ``answer`` on a prepared ``response``, faults included."""
    from pipeline.mock.server import _usage  # the server imports this module: import late

    faults = config.streaming
    active = faults.applies(chat.body)
    include_usage = chat.include_usage and not (active and faults.no_usage)
    events = render(answer, plan, _usage(plan, config) if include_usage else None, faults.chunk_chars)
    if faults.comments:
        events = [_COMMENT + e for e in events]
        events[0] = b": mock stream start\n\n" + events[0]
    stop = faults.stop_after if active else None
    done = [] if active and faults.no_done else [_DONE]
    delay = faults.chunk_delay_ms / 1000.0
    if stop is None:
        await _write(response, events + done, delay)
        await response.write_eof()
        return
    await _write(response, events[:stop], delay)
    if faults.error_after is not None:
        await _write(response, [_error_event(answer, faults.error_status), *done], delay)
        await response.write_eof()
    elif faults.end_after is not None:
        await response.write_eof()
    else:
        if faults.stall_after is not None:
            await _stall(request, faults.stall_s)
        _cut(request)


async def _write(response: web.StreamResponse, events: list[bytes], delay: float) -> None:
    if not events:
        return
    if delay <= 0:
        await response.write(b"".join(events))
        return
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(delay)
        await response.write(event)


async def _stall(request: web.BaseRequest, seconds: float) -> None:
    """Send nothing until ``seconds`` pass or the client hangs up."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_POLL_S)


def _cut(request: web.BaseRequest) -> None:
    """Close the connection with the chunked body unfinished: the client sees a cut. (What was
    written is flushed first; aiohttp's own ``write_eof`` afterwards meets a closed transport,
    a ConnectionError it swallows.)"""
    transport = request.transport
    if transport is not None:
        transport.close()
