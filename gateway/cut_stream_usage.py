"""Token usage for a stream the client left before the backend reported it.

The backend's own `usage` comes in the last event, which a client that hangs up never lets arrive (the
gateway closes the backend connection at once, so generation stops). Without this, such a request would
be billed for no input at all. Output is one token per relayed content event (llama-server and OpenAI
send one token per event, after one role-only event). Input is counted the way the backend would:

- a local slot (llama-server) renders the chat with its own template (`POST /apply-template`) and counts
  it (`POST /tokenize`, with BOS), so the number matches what the slot reports for the same request;
- a remote upstream has no such endpoints, and if a slot cannot answer, the text is estimated at one
  token per four characters.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from .backend_http import BackendClient, BackendError
from .policy import RequestContext
from .targets import Target

CHARS_PER_TOKEN = 4
TIMEOUT_S = 2.0  # per call; the request still holds its place among those in flight meanwhile


async def usage_of_cut_stream(client: BackendClient, ctx: RequestContext) -> dict[str, Any]:
    """An OpenAI-shaped `usage` for `ctx`, marked `"estimated": true`."""
    output = max(0, ctx.streamed_events - 1)  # less the role-only first event
    prompt = None
    if ctx.target is not None and ctx.target.slot is not None:
        prompt = await _slot_prompt_tokens(client, ctx.target, ctx.endpoint, ctx.payload)
    if prompt is None:
        prompt = math.ceil(len(_prompt_text(ctx.payload)) / CHARS_PER_TOKEN)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output, "estimated": True}


async def _slot_prompt_tokens(client: BackendClient, target: Target, endpoint: str,
                              payload: dict[str, Any]) -> int | None:
    root = target.base_url.removesuffix("/v1")
    try:
        if endpoint == "chat":
            text = (await _post(client, f"{root}/apply-template", {"messages": payload.get("messages")}))["prompt"]
        else:
            text = payload.get("prompt")
        if not isinstance(text, str):
            return None
        tokens = (await _post(client, f"{root}/tokenize", {"content": text, "add_special": True}))["tokens"]
        return len(tokens)
    except (BackendError, KeyError, TypeError, orjson.JSONDecodeError):
        return None


async def _post(client: BackendClient, url: str, payload: dict[str, Any]) -> Any:
    resp = await client.request("POST", url, {"Content-Type": "application/json"}, orjson.dumps(payload), TIMEOUT_S)
    try:
        data = await resp.read(TIMEOUT_S)
    finally:
        resp.release()
    if resp.status != 200:
        raise BackendError(f"{url} answered {resp.status}", "response")
    return orjson.loads(data)


def _prompt_text(payload: dict[str, Any]) -> str:
    """The text a request sends: message contents (and text parts), or the completion prompt(s)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "".join(p for p in prompt if isinstance(p, str))
    parts = []
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "".join(parts)
