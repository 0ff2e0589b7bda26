"""A stand-in LLM provider: Groq's OpenAI-compatible API under `/llm/openai/v1`, and its Statuspage under `/statuspage`.

Speaks the real wire format: the OpenAI model list and chat completion shapes, the `{"error": {...}}` body with
Groq's codes, Groq's `x-ratelimit-*` headers on every answer, and `retry-after` on a 429. The key it accepts comes
from `LLM_API_KEY` (default `sandbox-llm-api-key`). `GET /_sandbox/llm/requests` lists what reached it, so tests can
prove a run sent nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from aiohttp import web

from canary.sandbox.faults import FAULTS, HANG_SECONDS

PREFIX = "/llm/openai/v1"
DEFAULT_API_KEY = "sandbox-llm-api-key"
MODELS = (
    ("meta-llama/llama-4-scout-17b-16e-instruct", "Meta"),
    ("llama-3.3-70b-versatile", "Meta"),
    ("llama-3.1-8b-instant", "Meta"),
    ("openai/gpt-oss-20b", "OpenAI"),
    ("whisper-large-v3", "OpenAI"),
)
# Groq's own figures: requests per day, tokens per minute.
REQUEST_LIMIT, TOKEN_LIMIT = 14400, 18000

FAULT_DEFAULTS: dict[str, Any] = {
    "llm": "ok",
    "llm_slow_seconds": 2.0,
    "llm_retry_after_seconds": 30.0,
    "statuspage_indicator": "none",
}
FAULT_CHOICES = {
    "llm": ("ok", "unauthorized", "rate_limited", "low_headroom", "model_missing", "model_unavailable", "slow", "error", "hang"),
    "statuspage_indicator": ("none", "minor", "major", "critical", "maintenance"),
}
DESCRIPTIONS = {
    "none": "All Systems Operational",
    "minor": "Minor Service Outage",
    "major": "Partial System Outage",
    "critical": "Major System Outage",
    "maintenance": "Service Under Maintenance",
}

LLM_REQUESTS = web.AppKey("llm_requests", list)
LLM_API_KEY = web.AppKey("llm_api_key", str)


def add_routes(app: web.Application) -> None:
    app[LLM_REQUESTS] = []
    app[LLM_API_KEY] = os.environ.get("LLM_API_KEY") or DEFAULT_API_KEY
    app.router.add_get(f"{PREFIX}/models", _models)
    app.router.add_post(f"{PREFIX}/chat/completions", _chat_completions)
    app.router.add_get("/statuspage/api/v2/status.json", _status)
    app.router.add_get("/_sandbox/llm/requests", _list_requests)


def _error(status: int, message: str, kind: str, code: str | None, headers: dict[str, str]) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status, headers=headers)


def _rate_limit_headers(request: web.Request, mode: str) -> dict[str, str]:
    served = len(request.app[LLM_REQUESTS])
    remaining_requests = 0 if mode == "rate_limited" else 7 if mode == "low_headroom" else max(REQUEST_LIMIT - served, 0)
    return {
        "x-ratelimit-limit-requests": str(REQUEST_LIMIT),
        "x-ratelimit-limit-tokens": str(TOKEN_LIMIT),
        "x-ratelimit-remaining-requests": str(remaining_requests),
        "x-ratelimit-remaining-tokens": str(0 if mode == "rate_limited" else TOKEN_LIMIT - 25),
        "x-ratelimit-reset-requests": "2m59.56s",
        "x-ratelimit-reset-tokens": "7.66s" if mode == "rate_limited" else "83ms",
        "x-request-id": f"req_sandbox{served:06d}",
    }


def _gate(request: web.Request) -> web.Response | None:
    """What every call goes through: recorded, the key checked, the org-wide faults applied. None to go on."""
    faults = request.app[FAULTS]
    mode = faults["llm"]
    authorization = request.headers.get("Authorization", "")
    request.app[LLM_REQUESTS].append({
        "method": request.method,
        "path": request.path,
        "synthetic": request.headers.get("X-Synthetic-Canary") == "1",
        "authorized": authorization == f"Bearer {request.app[LLM_API_KEY]}",  # the key itself is never kept
        "at": time.time(),
    })
    headers = _rate_limit_headers(request, mode)
    if mode == "unauthorized" or not request.app[LLM_REQUESTS][-1]["authorized"]:
        return _error(401, "Invalid API Key", "invalid_request_error", "invalid_api_key", headers)
    if mode == "rate_limited":
        wait = faults["llm_retry_after_seconds"]
        headers["retry-after"] = f"{wait:g}"
        return _error(
            429,
            "Rate limit reached for model `meta-llama/llama-4-scout-17b-16e-instruct` in organization `org_sandbox` "
            f"service tier `on_demand` on requests per day (RPD): Limit {REQUEST_LIMIT}, Used {REQUEST_LIMIT}, Requested 1. "
            f"Please try again in {wait:g}s. Visit https://console.groq.com/docs/rate-limits for more information.",
            "requests", "rate_limit_exceeded", headers,
        )
    return None


async def _models(request: web.Request) -> web.Response:
    refused = _gate(request)
    if refused is not None:
        return refused
    mode = request.app[FAULTS]["llm"]
    served = MODELS[1:] if mode == "model_missing" else MODELS
    data = [
        {"id": name, "object": "model", "created": 1_743_000_000 + index, "owned_by": owner}
        for index, (name, owner) in enumerate(served)
    ]
    return web.json_response({"object": "list", "data": data}, headers=_rate_limit_headers(request, mode))


_COMPLETION_IDS = itertools.count(1)


async def _chat_completions(request: web.Request) -> web.Response:
    refused = _gate(request)
    if refused is not None:
        return refused
    faults = request.app[FAULTS]
    mode = faults["llm"]
    headers = _rate_limit_headers(request, mode)
    try:
        body = await request.json()
        request.app[LLM_REQUESTS][-1]["json"] = body
        model = str(body["model"])
        messages = body["messages"]
    except (ValueError, KeyError, TypeError):
        return _error(400, "'messages' and 'model' are required properties", "invalid_request_error", None, headers)
    if model not in dict(MODELS) or mode in ("model_missing", "model_unavailable"):
        return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found", headers)
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "slow":
        await asyncio.sleep(faults["llm_slow_seconds"])
    if mode == "error":
        return _error(503, f"{model} is currently over capacity. Please try again and back off exponentially. "
                      "Visit https://groqstatus.com to see if there is an active incident.",
                      "internal_server_error", None, headers)
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict)) + 10
    completion_tokens = 1
    number = next(_COMPLETION_IDS)
    return web.json_response(
        {
            "id": f"chatcmpl-sandbox{number:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"}, "logprobs": None,
                         "finish_reason": "length" if body.get("max_tokens") == 1 else "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_sandbox",
            "x_groq": {"id": f"req_sandbox{number:08d}"},
        },
        headers=headers,
    )


async def _status(request: web.Request) -> web.Response:
    indicator = request.app[FAULTS]["statuspage_indicator"]
    return web.json_response({
        "page": {
            "id": "sandboxllm0001",
            "name": "Sandbox LLM Provider",
            "url": str(request.url.with_path("/statuspage").with_query(None)),
            "time_zone": "Etc/UTC",
            "updated_at": "2025-01-01T00:00:00.000Z",
        },
        "status": {"indicator": indicator, "description": DESCRIPTIONS[indicator]},
    })


async def _list_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": request.app[LLM_REQUESTS]})
