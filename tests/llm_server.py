"""A small OpenAI-compatible server for tests: real sockets, vLLM's response shape.

It answers ``POST /v1/chat/completions`` like ``vllm serve`` does (including
``choices[0].logprobs.content[i].{token, logprob, bytes, top_logprobs}``),
``GET /v1/models`` and ``GET /health``, and records every request body and header.

The "model" reads markers written in the ticket text, so each item of a concurrent
batch can be told how to behave, whatever order its request arrives in:

    expect=LABEL   answer LABEL (any string: out-of-set answers too); default: the first
                   label listed in the prompt
    p=0.8          probability of the answer's first token (the rest goes to the other
                   labels' first tokens, and 0.01 to a junk token "The")
    sentence       answer "The answer is LABEL." instead of the bare label
    json           answer {"label": "LABEL"}
    nologprobs     leave logprobs out of the answer
    fail=500x2     answer HTTP 500 to the first 2 requests for this ticket (also 429, 503)
    slow=0.5x1     wait 0.5 s before answering the first request for this ticket
    malformed      answer 200 with a body that is not JSON

Tests may also replace ``respond`` to script anything else: a ``Reply`` sets the content,
``finish_reason`` and ``reasoning_content``, and its ``patch`` may edit the finished body
(a null logprob, ``"choices": []``); floats such as -inf go out as Python writes them
(``-Infinity``), as Python-based servers do.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MODEL = "test-model"
JUNK_TOKEN, JUNK_P = "The", 0.01
_TOKEN = re.compile(r"\s*[A-Za-z]+|\s*\d+|\s*[^\sA-Za-z\d]|\s+")


@dataclass
class Reply:
    content: str | None = None
    first_p: float = 0.9  # probability of the answer's first label token
    labels: list[str] = field(default_factory=list)
    logprobs: bool = True
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent as is instead of a completion
    finish_reason: str = "stop"
    reasoning: str | None = None  # the message's reasoning_content
    patch: Callable[[dict[str, Any]], None] | None = None  # edits the completion body


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def completion_logprobs(reply: Reply, answer: str, label: str, k: int) -> dict[str, Any]:
    """vLLM's chat logprobs: every token near-certain except the label's first token,
    where ``first_p`` goes to it and the rest to the other labels and a junk token."""
    tokens = tokenize(answer)
    at = answer.find(label) if label else -1
    content, pos = [], 0
    for token in tokens:
        start, pos = pos, pos + len(token)
        if start <= at < pos and at >= 0:
            others = [tokenize(lb)[0] for lb in reply.labels if lb != label]
            share = (1 - reply.first_p - JUNK_P) / max(1, len(others))
            chosen = token_entry(token, math.log(reply.first_p))
            top = [chosen, *(token_entry(o, math.log(share)) for o in others)]
            top.append(token_entry(JUNK_TOKEN, math.log(JUNK_P)))
            top.sort(key=lambda e: -e["logprob"])
        else:
            chosen = token_entry(token, -0.001)
            top = [dict(chosen)]
        content.append({**chosen, "top_logprobs": top[:k]})
    return {"content": content}


class LLMServer:
    def __init__(self, retry_after: str = "0") -> None:
        self.retry_after = retry_after
        self.requests: list[dict[str, Any]] = []
        self.proxied: list[str] = []  # absolute URLs of requests sent to it as a proxy
        self.headers: list[dict[str, str]] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.respond: Callable[[dict[str, Any], int], Reply] = self.default_reply
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def start(self) -> LLMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def default_reply(self, body: dict[str, Any], attempt: int) -> Reply:
        prompt = body["messages"][-1]["content"]
        ticket = prompt.split("<ticket>", 1)[-1]
        choice = (body.get("structured_outputs") or {}).get("choice")
        listed = re.search(r"one of: ([^.\n]+)", prompt)
        labels = choice or ([s.strip() for s in listed.group(1).split(",")] if listed else [])
        marker = dict(re.findall(r"\b(expect|p|fail|slow)=(\S+)", ticket))
        flags = set(re.findall(r"\b(sentence|json|nologprobs|malformed)\b", ticket))
        label = marker.get("expect", labels[0] if labels else "")
        reply = Reply(labels=labels, logprobs="nologprobs" not in flags)
        reply.first_p = float(marker.get("p", 0.9))
        reply.content = (
            f"The answer is {label}."
            if "sentence" in flags
            else json.dumps({"label": label})
            if "json" in flags
            else label
        )
        if "fail" in marker:
            status, times = marker["fail"].split("x")
            if attempt <= int(times):
                reply.status = int(status)
                if status == "429":
                    reply.headers["Retry-After"] = self.retry_after
        if "slow" in marker:
            delay, times = marker["slow"].split("x")
            if attempt <= int(times):
                reply.delay_s = float(delay)
        if "malformed" in flags:
            reply.raw_body = b'{"choices": [{"message": '
        return reply

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        answer = reply.content or ""
        label = max((lb for lb in reply.labels if lb in answer), key=len, default=answer)
        logprobs = None
        if body.get("logprobs") and reply.logprobs:
            logprobs = completion_logprobs(reply, answer, label, int(body.get("top_logprobs", 0)))
        n_out = len(tokenize(answer))
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.content,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": reply.reasoning,
                    },
                    "logprobs": logprobs,
                    "finish_reason": reply.finish_reason,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": 100,
                "total_tokens": 100 + n_out,
                "completion_tokens": n_out,
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
        if reply.patch is not None:
            reply.patch(completion)
        return completion


def _handler(server: LLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send(200, b"")
            elif self.path == "/v1/models":
                model = {"id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL,
                         "parent": None, "max_model_len": 4096}  # fmt: skip
                self.send(200, json.dumps({"object": "list", "data": [model]}).encode())
            else:
                self.send(404, b'{"error": "not found"}')

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("http://"):  # sent to it as to a proxy: answered all the same
                server.proxied.append(self.path)
                self.path = urlsplit(self.path).path
            if self.path != "/v1/chat/completions":
                self.send(404, b'{"error": "not found"}')
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self.send(400, b'{"error": "invalid JSON"}')
                return
            with server.lock:
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                key = body["messages"][-1]["content"]
                server.attempts[key] += 1
                attempt = server.attempts[key]
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                reply = server.respond(body, attempt)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    error = {"object": "error", "message": "scripted failure", "code": reply.status}
                    self.send(reply.status, json.dumps(error).encode(), reply.headers)
                elif reply.raw_body is not None:
                    self.send(200, reply.raw_body, reply.headers)
                else:
                    self.send(200, json.dumps(server.completion(body, reply)).encode())
            finally:
                with server.lock:
                    server.in_flight -= 1

    return Handler


@contextmanager
def llm_server(**kwargs: Any) -> Iterator[LLMServer]:
    server = LLMServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
