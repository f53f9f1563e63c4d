"""The OpenAI API through the gateway, with the official SDK, against real llama-server slots."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from gateway.api_common import MAX_BODY_BYTES

from .conftest import RunningGateway

PROMPT = [{"role": "user", "content": "Name three colors."}]


def test_chat_completion(gateway: RunningGateway) -> None:
    reply = gateway.client().chat.completions.create(model="gemma", messages=PROMPT, max_tokens=24)
    assert reply.choices[0].message.content.strip()
    assert reply.model == "gemma"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_chat_completion_streams_in_several_chunks(gateway: RunningGateway) -> None:
    stream = gateway.client().chat.completions.create(model="gemma", messages=PROMPT, max_tokens=24, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip()


def test_stream_arrives_incrementally(gateway: RunningGateway) -> None:
    """The first token reaches the client well before the answer is complete (no buffering)."""
    import time

    body = {"model": "gemma", "messages": PROMPT, "max_tokens": 64, "stream": True,
            "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                      headers=gateway.headers()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
        total = time.perf_counter() - started
    assert first is not None
    assert first < total / 2, f"first chunk at {first:.3f}s of {total:.3f}s: the stream was buffered"


def test_legacy_completion(gateway: RunningGateway) -> None:
    reply = gateway.client().completions.create(model="gemma", prompt="The capital of France is", max_tokens=8)
    assert reply.choices[0].text.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_embeddings_from_embedding_slot(gateway: RunningGateway) -> None:
    reply = gateway.client().embeddings.create(model="gemma-embed", input=["hello world", "good night"])
    assert len(reply.data) == 2
    assert all(len(d.embedding) == 640 for d in reply.data)
    assert reply.data[0].embedding != reply.data[1].embedding


def test_embeddings_without_model_go_to_the_embedding_slot(gateway: RunningGateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/embeddings", json={"input": "hello"}, timeout=30, headers=gateway.headers())
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 640


def test_chat_without_model_goes_to_a_text_slot(gateway: RunningGateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 4}, timeout=60,
                   headers=gateway.headers())
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gemma"


def test_models_lists_slots_and_upstreams(gateway: RunningGateway) -> None:
    models = {m.id: m for m in gateway.client().models.list()}
    assert {"gemma", "gemma-embed", "remote-gemma"} <= set(models)
    assert models["gemma"].model_extra["type"] == "text"
    assert models["gemma-embed"].model_extra["type"] == "embedding"
    assert models["remote-gemma"].model_extra["backend"] == "upstream:remote"


def test_a_model_is_retrieved_by_id(gateway: RunningGateway) -> None:
    client = gateway.client()
    model = client.models.retrieve("gemma")
    assert model.id == "gemma" and model.object == "model"
    assert model.model_extra and model.model_extra["type"] == "text"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_remote_upstream_is_reached_by_model_name(gateway: RunningGateway) -> None:
    reply = gateway.client().chat.completions.create(model="remote-gemma", messages=PROMPT, max_tokens=8)
    assert reply.model == "remote-gemma"  # the remote llama-server's alias, so it really answered
    assert reply.choices[0].message.content


def test_remote_upstream_streams(gateway: RunningGateway) -> None:
    stream = gateway.client().chat.completions.create(model="remote-gemma", messages=PROMPT, max_tokens=16,
                                                      stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()


def test_unknown_model_is_404_in_openai_shape(gateway: RunningGateway) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        gateway.client().chat.completions.create(model="no-such-model", messages=PROMPT)
    error = err.value.body
    assert error["code"] == "model_not_found"
    assert "no-such-model" in error["message"] and "gemma" in error["message"]
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "nope", "messages": PROMPT},
                   headers=gateway.headers())
    assert r.status_code == 404
    assert set(r.json()["error"]) >= {"message", "type", "code"}


def test_malformed_json_is_400(gateway: RunningGateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=b'{"model": "gemma", "messages": [',
                   headers={"content-type": "application/json", **gateway.headers()})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_json"


def test_non_object_body_is_400(gateway: RunningGateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=["not", "an", "object"], headers=gateway.headers())
    assert r.status_code == 400


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(gateway: RunningGateway) -> None:
    """No Content-Length to check up front: the gateway must stop reading at the limit, not buffer it all."""
    url = urlsplit(gateway.url)
    head = "".join(f"{k}: {v}\r\n" for k, v in gateway.headers().items())
    chunk = b"%x\r\n" % 2**20 + b" " * 2**20 + b"\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

        def pump() -> None:  # keeps sending well past the limit until the gateway stops listening
            try:
                for _ in range(MAX_BODY_BYTES // 2**20 + 16):
                    sock.sendall(chunk)
            except OSError:
                pass

        threading.Thread(target=pump, daemon=True).start()
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, "the gateway closed the connection without an answer"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_embedding_request_to_text_model_says_why(gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client().embeddings.create(model="gemma", input="hi")
    assert "embedding" in err.value.body["message"]


def test_backend_errors_pass_through_in_openai_shape(gateway: RunningGateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "gemma", "messages": "not a list"},
                   timeout=30, headers=gateway.headers())
    assert 400 <= r.status_code < 500
    assert "message" in r.json()["error"]


def test_unknown_route_and_method_in_openai_shape(gateway: RunningGateway) -> None:
    r = httpx.get(f"{gateway.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{gateway.url}/v1/chat/completions", headers=gateway.headers())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_health(gateway: RunningGateway) -> None:
    r = httpx.get(f"{gateway.url}/health")
    assert r.status_code == 200
    assert r.json()["slots"]["4801"] == "ready"


def test_landing_page_lists_the_api(gateway: RunningGateway) -> None:
    r = httpx.get(gateway.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "llm-gateway" in r.text and "/v1/models" in r.text


def test_uptime_history_records_slot_states(gateway: RunningGateway) -> None:
    uptime = httpx.get(f"{gateway.url}/api/uptime").json()
    assert uptime["components"]["slot:4801"]["model"] == "gemma"
    states = [event["state"] for event in uptime["history"]["slot:4801"]]
    assert states[:2] == ["loading", "ready"]
