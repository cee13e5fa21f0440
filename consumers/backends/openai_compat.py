"""Backend ``openai``: any OpenAI-compatible server (vllm serve, llama.cpp, TGI, Ollama).

One request per item, sent concurrently up to ``max_concurrency`` so the server can
batch them; temperature 0, a few output tokens, the label set sent as a constraint in
the style the server understands, logprobs requested for the confidence. The answer
is always parsed and checked against the label set (``answers.py``): an old server
ignores a constraint field it does not know without saying so.

``endpoint = "chat"`` sends the task's chat messages to /chat/completions;
``"completion"`` sends its plain few-shot prompt (ending in "Answer:") to
/completions, for base models that have no chat template. Backend ``llama-cpp`` is
this backend pointed at a model tribunal serves itself (``[models.NAME]``): its
``base_url`` comes from the server tribunal started, its constraint defaults to
``grammar`` (a GBNF grammar, which llama-server honours and vLLM ignores).

``classify`` is synchronous, as the worker loop is. It hands the batch to an asyncio
loop that runs for the backend's lifetime in a daemon thread, so one
``httpx.AsyncClient`` — and its pool of keep-alive connections — serves every batch.
(``asyncio.run`` per batch would need a new client each time, because connections are
bound to the loop that opened them: a new TCP, and for hosted APIs TLS, handshake per
connection per batch.) The thread costs nothing while idle and dies with the process.
``classify`` may be called from several threads at once: the calls share the loop, the
connections and ``max_concurrency``. Keep ``max_concurrency`` above the server's slots so
a request always waits in the server's queue for the next slot that frees (``llama-cpp``
defaults it to twice the model's slots, at least 16).

Failures are per item: after ``max_retries`` retries (429, 408, 5xx, connection errors
and timeouts, with exponential backoff and jitter, honouring ``Retry-After``) the item
gets an abstention carrying the error; the rest of the batch is unaffected. However
long that takes, the consumer's keeper thread renews its claim on the batch's entries
(consumers/engine/loop.py), so no other replica takes them over while they are being asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx
import orjson

from common.errors import TribunalError
from common.schemas import Item, Prediction, now
from common.tasks import TaskSpec
from consumers.backends.answers import parsers
from consumers.backends.base import RawOptions, parse_options, unsupported
from consumers.backends.context import Overflow, overflow_of, shortened
from consumers.backends.openai_wire import (
    DEFAULT_MAX_TOKENS,
    OpenAIOptions,
    RequestBody,
    constraint_fields,
    parse_completion,
    prompt_usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CONTEXT_TRIES = 4  # asks of an item over the context: each keeps less (backends/context.py)


def is_loopback(host: str) -> bool:
    """``host`` names this machine's loopback: localhost (also with its root dot) or an
    address in 127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``*_PROXY`` less ``NO_PROXY``, read as
    urllib and httpx read them), None for this machine's own addresses."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_loopback(host) or proxy_bypass(host):
        return None
    proxies = getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


class RequestFailed(TribunalError):
    """An item's request failed for good (retries exhausted or not worth retrying).
    ``refused``: the server refused it (a 4xx other than 408 and 429), so asking again gets
    the same answer; ``overflow``: the refusal is for a prompt over the model's context."""

    def __init__(self, message: str, refused: bool = False, overflow: Overflow | None = None):
        super().__init__(message)
        self.refused, self.overflow = refused, overflow


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


class OpenAICompatible:
    name = "openai"
    Options = OpenAIOptions

    def __init__(self, options: OpenAIOptions | RawOptions, tasks: Mapping[str, TaskSpec]) -> None:
        self.opts = parse_options(OpenAIOptions, options)
        self.tasks = dict(tasks)
        self.parsers = parsers(tasks)
        self.max_tokens = self.opts.max_tokens or DEFAULT_MAX_TOKENS[self.opts.constraint]
        self.stats: Counter[str] = Counter()  # requests, retries, failures: for tests and logs
        headers = {"Content-Type": "application/json"}
        key = self.opts.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"openai:{self.opts.model}", daemon=True
        )
        self._thread.start()
        self._client = self._run(self._open(headers))
        self._limit = asyncio.Semaphore(self.opts.max_concurrency)

    async def _open(self, headers: dict[str, str]) -> httpx.AsyncClient:
        n = self.opts.max_concurrency
        return httpx.AsyncClient(
            base_url=self.opts.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.opts.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            # A proxy from the environment (HTTPS_PROXY, ALL_PROXY: common on corporate
            # machines) is used for a remote server, never for this machine's own: without
            # NO_PROXY, httpx would send loopback requests to the proxy too.
            trust_env=not is_loopback(urlsplit(self.opts.base_url).hostname or ""),
        )

    @property
    def _proxy_note(self) -> str:
        """What a connection error should add when it went through a proxy."""
        proxy = proxy_for(self.opts.base_url)
        return f" (through the proxy {proxy} set in the environment)" if proxy else ""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def classify(self, items: Sequence[Item]) -> list[Prediction]:
        return self._run(self._classify(items))

    async def _classify(self, items: Sequence[Item]) -> list[Prediction]:
        return list(await asyncio.gather(*(self._one(item) for item in items)))

    @property
    def path(self) -> str:
        return "/chat/completions" if self.opts.endpoint == "chat" else "/completions"

    def request(self, item: Item, task: TaskSpec) -> RequestBody:
        """The (chat) completion request body for one item."""
        opts = self.opts
        body: RequestBody = {
            "model": opts.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        # A RequestBody is a ConstraintFields with more keys: merged as a dict, as they are.
        body = cast(
            RequestBody, body | constraint_fields(opts.constraint, task.labels, opts.endpoint)
        )
        if opts.endpoint == "chat":
            json_answer = opts.constraint == "response_format"
            body["messages"] = task.messages(item, json_answer=json_answer)
            if opts.logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = opts.top_logprobs
        else:
            body["prompt"] = task.prompt(item)
            body["stop"] = ["\n"]  # a base model would go on with the next few-shot example
            if opts.logprobs:
                body["logprobs"] = opts.top_logprobs  # the completions API takes a count
        # extra_body's keys are the user's (a TypedDict allows keys beyond its own)
        return cast(RequestBody, {**body, **opts.extra_body})

    async def _one(self, item: Item) -> Prediction:
        task = self.tasks.get(item.task)
        if task is None:
            return unsupported(self.name, item)
        asked, keep, cut = item, 1.0, 0
        async with self._limit:
            for attempt in range(CONTEXT_TRIES):
                try:
                    data = await self._post(self.request(asked, task))
                    break
                except RequestFailed as exc:
                    if exc.overflow is None or attempt + 1 == CONTEXT_TRIES:
                        self.stats["failures"] += 1
                        return Prediction(label=None, error=str(exc), refused=exc.refused)
                    # Over the model's context: the part of the ticket that fits, once more.
                    keep *= exc.overflow.keep(self.max_tokens)
                    asked, cut = shortened(item, keep)
        try:
            out = parse_completion(data)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            self.stats["failures"] += 1
            # A ValueError is parse_completion's own sentence; the others name what is missing.
            why = str(exc) if type(exc) is ValueError else repr(exc)
            return Prediction(
                label=None,
                error=f"unexpected response shape: {why}",
                raw=orjson.dumps(data)[:500].decode(errors="replace"),
            )
        prediction = self.parsers[item.task].prediction(
            out.text,
            out.tokens,
            finish_reason=out.finish_reason,
            reasoning=out.reasoning,
            inputs=(asked.text, asked.text_b),  # a quotation of the ticket is not its answer
        )
        usage = prompt_usage(data) or (None, None)
        return prediction.model_copy(
            update={"prompt_tokens": usage[0], "cached_tokens": usage[1], "truncated_chars": cut}
        )

    async def _post(self, body: RequestBody) -> Any:
        """POST with retries; returns the decoded JSON body of a 200 answer."""
        attempts = self.opts.max_retries + 1
        for attempt in range(attempts):
            wait: float | None = None
            self.stats["requests"] += 1
            try:
                response = await self._client.post(self.path, content=orjson.dumps(body))
            except httpx.TimeoutException:
                error = f"timed out after {self.opts.timeout_s}s"
            except httpx.TransportError as exc:
                error = f"connection error: {type(exc).__name__}: {exc}{self._proxy_note}"
            else:
                if response.status_code == 200:
                    try:
                        return orjson.loads(response.content)
                    except orjson.JSONDecodeError:
                        pass
                    try:  # Python's json also reads NaN and -Infinity, which servers in
                        return json.loads(response.content)  # Python write for masked logprobs
                    except ValueError as exc:
                        # Deterministic at temperature 0: retrying would get the same.
                        raise RequestFailed(f"malformed JSON in the response: {exc}") from None
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if not (response.status_code in (408, 429) or response.status_code >= 500):
                    overflow = overflow_of(response.status_code, response.text)
                    raise RequestFailed(error, refused=True, overflow=overflow)
                wait = retry_after_s(response.headers.get("retry-after"))
            if attempt + 1 < attempts:
                self.stats["retries"] += 1
                delay = self.backoff(attempt, wait)
                log.debug("%s: %s; retry %d in %.2fs", self.opts.model, error, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise RequestFailed(f"{error} (gave up after {attempts} attempts)")

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter; a server's Retry-After is a minimum."""
        cap = min(self.opts.backoff_max_s, self.opts.backoff_s * 2.0**attempt)
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.opts.retry_after_max_s))
        return delay
