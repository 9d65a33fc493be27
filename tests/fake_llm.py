"""A local stand-in for the OpenAI and Anthropic HTTP APIs, for tests.

The real SDKs are pointed at it through their ``base_url``, so the objects the
metering code sees are parsed by the SDKs themselves, not hand-built doubles:

    with FakeLLMServer() as server:
        server.next_usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)
        anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0)

The test decides what the "provider" reports (usage queued per request or a
default), makes calls fail with a provider-shaped error, slows or cuts streams,
and reads back every request it received.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import itertools
import json
import struct
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from types import TracebackType


@dataclasses.dataclass(frozen=True)
class OpenAIUsage:
    """Counts in OpenAI's vocabulary: ``prompt_tokens`` includes ``cached_tokens``
    and ``completion_tokens`` includes ``reasoning_tokens``.

    The Responses API answers them as ``input_tokens``/``output_tokens``; the
    embeddings route uses ``prompt_tokens`` only.
    """

    prompt_tokens: int = 12
    completion_tokens: int = 5
    cached_tokens: int = 0
    #: ``None`` leaves the field out of chat answers, as most models do.
    cache_write_tokens: int | None = None
    reasoning_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class AnthropicUsage:
    """Counts in Anthropic's vocabulary: ``input_tokens`` excludes both cache counts."""

    input_tokens: int = 12
    output_tokens: int = 5
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    #: ``None`` leaves ``output_tokens_details`` out, as non-thinking models do.
    thinking_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, for asserting how often a provider was called."""

    path: str
    headers: dict[str, str]
    #: The parsed JSON body (``None`` when there was none).
    body: t.Any


#: An SSE event: its ``event:`` name (``None`` for OpenAI chat) and its ``data:`` text.
_Event = tuple[str | None, str]
_Reply = dict[str, t.Any] | list[_Event]


def _typed(data: dict[str, t.Any]) -> _Event:
    """An event named after its ``type``, as Anthropic and the Responses API send them."""
    return data["type"], json.dumps(data)


def _openai_chat_usage(u: OpenAIUsage) -> dict[str, t.Any]:
    prompt_details: dict[str, t.Any] = {"cached_tokens": u.cached_tokens, "audio_tokens": 0}
    if u.cache_write_tokens is not None:
        prompt_details["cache_write_tokens"] = u.cache_write_tokens
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0},
    }


def _chat(body: dict[str, t.Any], model: str, u: OpenAIUsage, pieces: list[str]) -> _Reply:
    base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
    usage = _openai_chat_usage(u)
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    def chunk(choices: list[dict[str, t.Any]], **extra: t.Any) -> _Event:
        return None, json.dumps({**base, "object": "chat.completion.chunk", "choices": choices, **extra})

    def streamed(delta: dict[str, t.Any], finish_reason: str | None = None) -> dict[str, t.Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    events = [chunk([streamed({"role": "assistant", "content": ""})])]
    events += [chunk([streamed({"content": piece})]) for piece in pieces]
    events.append(chunk([streamed({}, "stop")]))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(chunk([], usage=usage))
    events.append((None, "[DONE]"))
    return events


def _responses(
    body: dict[str, t.Any], model: str, u: OpenAIUsage, pieces: list[str], *, item_events: bool = False
) -> _Reply:
    text = {"type": "output_text", "text": "".join(pieces), "annotations": []}
    message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant"}
    usage = {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": u.cached_tokens,
            "cache_write_tokens": u.cache_write_tokens or 0,
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
    response = {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": [{**message, "content": [text]}],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }
    if not body.get("stream"):
        return response
    sequence = itertools.count()

    def event(**data: t.Any) -> _Event:
        return _typed({**data, "sequence_number": next(sequence)})

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    delta = {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "logprobs": []}
    if not item_events:
        return [
            event(type="response.created", response=started),
            *(event(type="response.output_text.delta", delta=p, **delta) for p in pieces),
            event(type="response.completed", response=response),
        ]
    # As the real API does, which the SDK's responses.stream() helper needs to build its snapshot.
    where = {"output_index": 0}
    part = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    return [
        event(type="response.created", response=started),
        event(type="response.output_item.added", item={**message, "status": "in_progress", "content": []}, **where),
        event(type="response.content_part.added", part={**text, "text": ""}, **part),
        *(event(type="response.output_text.delta", delta=p, **delta) for p in pieces),
        event(type="response.output_item.done", item={**message, "content": [text]}, **where),
        event(type="response.completed", response=response),
    ]


def _embeddings(body: dict[str, t.Any], model: str, u: OpenAIUsage, pieces: list[str]) -> _Reply:
    inputs = body.get("input")
    # A flat list of ints is one pre-tokenised input, not many.
    many = isinstance(inputs, list) and not all(isinstance(i, int) for i in inputs)
    vector = [0.25, -0.5, 1.0]
    encoded: t.Any = vector
    if body.get("encoding_format") == "base64":
        encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    data = [
        {"object": "embedding", "index": i, "embedding": encoded}
        for i in range(len(t.cast(list[t.Any], inputs)) if many else 1)
    ]
    usage = {"prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _messages(body: dict[str, t.Any], model: str, u: AnthropicUsage, pieces: list[str]) -> _Reply:
    usage: dict[str, t.Any] = {
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "output_tokens": u.output_tokens,
        "service_tier": "standard",
    }
    if u.thinking_tokens is not None:
        usage["output_tokens_details"] = {"thinking_tokens": u.thinking_tokens}
    message = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if not body.get("stream"):
        return message
    # As the real API does: message_start reports the input side with output_tokens 1,
    # and message_delta the cumulative totals, repeating the input counts.
    start_usage = {k: v for k, v in usage.items() if k != "output_tokens_details"}
    start_usage["output_tokens"] = 1
    start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    text_block = {"type": "text", "text": ""}
    end = {"stop_reason": "end_turn", "stop_sequence": None}
    deltas = [{"type": "text_delta", "text": p} for p in pieces]
    return [
        _typed({"type": "message_start", "message": start}),
        _typed({"type": "ping"}),
        _typed({"type": "content_block_start", "index": 0, "content_block": text_block}),
        *(_typed({"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas),
        _typed({"type": "content_block_stop", "index": 0}),
        _typed({"type": "message_delta", "delta": end, "usage": usage}),
        _typed({"type": "message_stop"}),
    ]


_OPENAI_ROUTES: dict[str, t.Callable[[dict[str, t.Any], str, OpenAIUsage, list[str]], _Reply]] = {
    "/v1/chat/completions": _chat,
    "/v1/responses": _responses,
    "/v1/embeddings": _embeddings,
}
_ANTHROPIC_ROUTE = "/v1/messages"
#: HTTP status -> the error ``type`` OpenAI and Anthropic put in their error bodies.
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_api_key", "authentication_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    529: ("server_error", "overloaded_error"),
}


class FakeLLMServer:
    """An OpenAI + Anthropic look-alike on ``127.0.0.1``, on a free port, in a daemon thread.

    Settings are plain attributes a test may change at any time; :meth:`reset`
    restores them and empties the queues and the request log.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._request_ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget queued usage, failures and logged requests; restore default settings."""
        with self._lock:
            #: Usage answered by OpenAI routes when none is queued.
            self.openai_usage = OpenAIUsage()
            #: Usage answered by the Anthropic route when none is queued.
            self.anthropic_usage = AnthropicUsage()
            #: Number of text deltas in a stream; the full text is the same pieces joined.
            self.stream_chunks = 5
            #: The text of each delta: a stream carries ``stream_chunks * len(chunk_text)`` chars.
            self.chunk_text = "hello "
            #: Seconds to wait before each streamed event after the first.
            self.chunk_delay = 0.0
            #: Responses API streams also send ``output_item``/``content_part`` events, as the
            #: real API does (the SDK's ``responses.stream()`` helper needs them).
            self.responses_item_events = False
            #: Request model -> the model answered (e.g. a dated name); others are echoed.
            self.model_map: dict[str, str] = {}
            self._openai_queue: collections.deque[OpenAIUsage] = collections.deque()
            self._anthropic_queue: collections.deque[AnthropicUsage] = collections.deque()
            self._failures: collections.deque[tuple[int, str | None]] = collections.deque()
            self._drops: collections.deque[int] = collections.deque()
            self._requests: list[RecordedRequest] = []

    def start(self) -> FakeLLMServer:
        """Bind a free port and serve in a daemon thread; returns ``self``."""
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: Anthropic's ``base_url``; OpenAI's is this plus ``/v1``."""
        if self._httpd is None:
            raise RuntimeError("FakeLLMServer is not started: call start() or use it as a context manager.")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def next_usage(self, **counts: t.Any) -> None:
        """Queue the usage of the next OpenAI answer (chat, responses or embeddings).

        Takes :class:`OpenAIUsage` fields; unset ones use its defaults, not ``openai_usage``.
        """
        with self._lock:
            self._openai_queue.append(OpenAIUsage(**counts))

    def next_anthropic_usage(self, **counts: t.Any) -> None:
        """Queue the usage of the next Anthropic answer; takes :class:`AnthropicUsage` fields."""
        with self._lock:
            self._anthropic_queue.append(AnthropicUsage(**counts))

    def fail_next(self, status: int = 500, *, message: str | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests (any route) with ``status`` and the
        provider's JSON error body, so the SDK raises its typed error
        (``RateLimitError`` for 429, ``InternalServerError`` for 500, ...)."""
        with self._lock:
            self._failures.extend([(status, message)] * times)

    def drop_next_stream(self, after_events: int) -> None:
        """Cut the next streamed answer's connection after ``after_events`` SSE events,
        as a provider or proxy dying mid-stream would (the SDK then raises a connection error)."""
        with self._lock:
            self._drops.append(after_events)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The requests received on ``path``, e.g. ``"/v1/chat/completions"``."""
        return [r for r in self.requests if r.path == path]

    def _answer(self, request: RecordedRequest) -> tuple[int, _Reply, int | None]:
        """Decide the status, body and stream cut for one request, under the lock."""
        with self._lock:
            self._requests.append(request)
            body = request.body if isinstance(request.body, dict) else {}
            anthropic = request.path == _ANTHROPIC_ROUTE
            if self._failures:
                status, message = self._failures.popleft()
                return status, _error(status, message, anthropic=anthropic), None
            model = str(body.get("model", "unknown"))
            model = self.model_map.get(model, model)
            pieces = [self.chunk_text] * self.stream_chunks
            if anthropic:
                usage_a = self._anthropic_queue.popleft() if self._anthropic_queue else self.anthropic_usage
                reply = _messages(body, model, usage_a, pieces)
            elif request.path in _OPENAI_ROUTES:
                usage_o = self._openai_queue.popleft() if self._openai_queue else self.openai_usage
                if request.path == "/v1/responses":
                    reply = _responses(body, model, usage_o, pieces, item_events=self.responses_item_events)
                else:
                    reply = _OPENAI_ROUTES[request.path](body, model, usage_o, pieces)
            else:
                return 404, _error(404, f"No route {request.path}", anthropic=False), None
            drop = self._drops.popleft() if isinstance(reply, list) and self._drops else None
            return 200, reply, drop


def _error(status: int, message: str | None, *, anthropic: bool) -> dict[str, t.Any]:
    """The provider's error body, which is what makes the SDK pick its typed exception."""
    text = message or f"Fake error {status}"
    openai_type, anthropic_type = _ERROR_TYPES.get(status, ("server_error", "api_error"))
    if anthropic:
        return {"type": "error", "error": {"type": anthropic_type, "message": text}}
    return {"error": {"message": text, "type": openai_type, "param": None, "code": None}}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeLLMServer

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        """A client that hangs up mid-stream (an abandoned stream) is expected, not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the SDKs keep connections alive and streams use chunked encoding.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for the
    # client's delayed ACK (40 ms on Linux), so every non-streamed answer took 40 ms.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: t.Any) -> None:
        """Keep test output clean; the request log is on the server object."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = RecordedRequest(
            path=self.path.split("?", 1)[0],
            headers={k.lower(): v for k, v in self.headers.items()},
            body=json.loads(raw) if raw else None,
        )
        fake = self.server.fake
        status, reply, drop = fake._answer(request)
        self.send_response(status)
        request_id = f"req_fake_{next(fake._request_ids)}"
        self.send_header("request-id" if request.path == _ANTHROPIC_ROUTE else "x-request-id", request_id)
        try:
            if isinstance(reply, list):
                self._send_stream(reply, drop, fake.chunk_delay)
            else:
                payload = json.dumps(reply).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up (e.g. a consumer that stopped reading a stream early).
            self.close_connection = True

    def _send_stream(self, events: list[_Event], drop: int | None, delay: float) -> None:
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, (name, data) in enumerate(events):
            if index == drop:
                # No terminating chunk: the client sees the body end prematurely.
                self.close_connection = True
                return
            if index and delay:
                time.sleep(delay)
            text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            encoded = text.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(encoded), encoded))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
