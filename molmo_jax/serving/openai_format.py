"""The OpenAI chat-completions format: request bodies -> the project's Request and sampling
settings, answers -> response objects and server-sent-event chunks.

Accepted body (anything else is refused with a 400 naming the unknown fields):

    {"model": str, "messages": [{"role": "user", "content": str | [part, ...]}],
     "max_tokens": int, "max_completion_tokens": int, "temperature": float, "top_p": float,
     "stop": str | [str], "stream": bool, "n": 1, "style": str (molmo-jax: the formatting style)}

    part: {"type": "text", "text": str} or {"type": "image_url", "image_url": {"url": str, "detail": str}}

One user message (Molmo answers one question about at most one image); image URLs are `data:`
URLs (base64) or http(s) URLs. Points in the answer are returned in pixels of the input image:
`choices[0].message.points` (streamed: the last chunk's `choices[0].delta.points`), each
{"label": str, "points": [[x, y], ...]}.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
import uuid
from typing import Any, Optional

from molmo_jax.inference.drawing import PointGroup

TOP_LEVEL = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
             "stream", "n", "style")
MESSAGE = ("role", "content")
PARTS = {"text": ("type", "text"), "image_url": ("type", "image_url")}
IMAGE_URL = ("url", "detail")
MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """An answer other than 200: `status` and one line naming the problem."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclasses.dataclass
class ChatRequest:
    """prompt: the user text; image: bytes (from a data: URL), an http(s) URL or None."""
    prompt: str
    image: Any
    style: str
    max_tokens: Optional[int]  # None: the server's default
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool
    model: Optional[str]


def _unknown(obj: dict, known, where: str) -> None:
    extra = sorted(set(obj) - set(known))
    if extra:
        raise ApiError(400, f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                            f"(accepted: {', '.join(known)})")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
    return body


def decode_data_url(url: str) -> bytes:
    """data:[<mime>][;base64],<data> -> bytes (base64 only: images are binary)."""
    head, comma, data = url[5:].partition(",")
    if not comma or not head.endswith(";base64"):
        raise ApiError(400, "image_url: a data: URL must be data:<mime>;base64,<data>")
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"image_url: bad base64 in the data: URL ({e})") from None
    if not out:
        raise ApiError(400, "image_url: the data: URL holds no bytes")
    return out


def _content(content: Any) -> tuple[str, Any]:
    """A user message's content -> (text, image source or None)."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ApiError(400, f"messages[0].content: expected a string or a list of parts, got "
                            f"{type(content).__name__}")
    texts, image = [], None
    for i, part in enumerate(content):
        where = f"messages[0].content[{i}]"
        if not isinstance(part, dict) or part.get("type") not in PARTS:
            raise ApiError(400, f"{where}: expected {{'type': 'text' | 'image_url', ...}}")
        _unknown(part, PARTS[part["type"]], where)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text: expected a string")
            texts.append(part["text"])
            continue
        spec = part.get("image_url")
        spec = {"url": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise ApiError(400, f"{where}.image_url: expected {{'url': str}}")
        _unknown(spec, IMAGE_URL, f"{where}.image_url")
        if image is not None:
            raise ApiError(400, f"{where}: one image per request (Molmo answers about one image)")
        url = spec["url"]
        if url.startswith("data:"):
            image = decode_data_url(url)
        elif url.startswith(("http://", "https://")):
            image = url
        else:
            raise ApiError(400, f"{where}.image_url.url: expected a data: or http(s) URL, got {url[:40]!r}")
    return " ".join(texts), image


def parse_chat_request(body: dict) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError(400) naming the first problem."""
    _unknown(body, TOP_LEVEL, "body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise ApiError(400, f"messages: expected exactly one user message, got roles {roles}")
    _unknown(messages[0], MESSAGE, "messages[0]")
    prompt, image = _content(messages[0].get("content"))
    if body.get("n", 1) != 1:
        raise ApiError(400, f"n: only 1 answer per request, got {body['n']!r}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, f"max_tokens: expected a positive integer, got {max_tokens!r}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if (not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop: expected a string or up to {MAX_STOP_STRINGS} non-empty strings")
    for name, kind in (("stream", bool), ("style", str), ("model", str)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise ApiError(400, f"{name}: expected a {kind.__name__}, got {body[name]!r}")
    return ChatRequest(prompt=prompt, image=image, style=body.get("style") or "user_qa", max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 1e-6, 1.0), stop=tuple(stop),
                       stream=bool(body.get("stream", False)), model=body.get("model"))


def points_in_pixels(groups: list[PointGroup], width: int, height: int) -> list[dict]:
    """PointGroups (percent of the image) -> [{"label", "points": [[x, y], ...]}] in pixels."""
    return [{"label": g.label, "points": [[round(x / 100 * width, 1), round(y / 100 * height, 1)]
                                          for x, y in g.points]} for g in groups if g.points]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish_reason: str, points: list[dict], prompt_tokens: int,
               completion_tokens: int) -> dict:
    message = {"role": "assistant", "content": text, **({"points": points} if points else {})}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish_reason: Optional[str] = None,
          usage: Optional[dict] = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(event: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or the literal [DONE])."""
    return f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n".encode()
