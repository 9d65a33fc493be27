"""A tiny local model server for the demo: it speaks the OpenAI and Anthropic wire formats.

When ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY`` are not set, the example app points
the official ``openai`` and ``anthropic`` SDKs at this server (their ``base_url``), so
``make demo`` works offline and costs nothing, while every response is still parsed
by the SDKs themselves and metered exactly like a real one.

Routes (HTTP/1.1 on 127.0.0.1):

* ``POST /v1/chat/completions``: OpenAI chat completions, plain or ``stream=True``
  (server-sent events; a last usage-only chunk when
  ``stream_options.include_usage`` is set, as OpenAI does).
* ``POST /v1/messages``: Anthropic messages, plain or ``stream=True``
  (``message_start`` ... ``message_delta`` with the usage ... ``message_stop``).

The "model" is not a language model: it writes a short, friendly answer that
quotes the question, word by word. Usage is counted like a provider would report
it: the prompt at about 4 characters a token plus 4 tokens per message, the
answer one token per streamed word, capped by the request's ``max_tokens``.

The app starts it on a thread on a free loopback port the first time a chat needs
it (see :mod:`example_app.llm`). To run it on its own::

    python -m example_app.model_server --port 8765
    EXAMPLE_MODEL_SERVER_URL=http://127.0.0.1:8765 make demo
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

#: Seconds between streamed words: slow enough to watch the answer arrive.
DEFAULT_DELAY = float(os.environ.get("EXAMPLE_MODEL_DELAY", "0.03"))

_OPENINGS = [
    "Good question!",
    "Happy to help.",
    "Here is what I can tell you.",
    "Let me think about that for a second.",
]
_BODIES = [
    "I am the demo's local model, so my knowledge is thin, but every word you are reading was streamed"
    " through the official SDK and metered by flask-ai-metering.",
    "Each answer costs a few hundred tokens, and your team's plan decides how many of them you get this month.",
    "Watch the usage meter at the top of the page: it moves after every answer, and on the Free plan it fills"
    " up quickly.",
    "Set OPENAI_API_KEY or ANTHROPIC_API_KEY before make demo and a real model answers instead of me.",
    "Admins can open the metering dashboard to see this very call, its tokens and its cost.",
]


def estimate_tokens(text: str) -> int:
    """About four characters a token, as the providers' own rule of thumb."""
    return math.ceil(len(text) / 4) if text else 0


def _text_of(content: t.Any) -> str:
    """The text of a message's content: a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def prompt_tokens(body: dict[str, t.Any]) -> int:
    """The prompt's size: every message's text plus 4 tokens a message and 3 for the reply."""
    messages = body.get("messages") or []
    total = 3 + estimate_tokens(_text_of(body.get("system")))
    for message in messages:
        if isinstance(message, dict):
            total += 4 + estimate_tokens(_text_of(message.get("content")))
    return total


def compose_answer(body: dict[str, t.Any]) -> list[str]:
    """The answer's words (each with its trailing space): one streamed token each."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    question = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    digest = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    quoted = " ".join(question.split()[:12]) + ("…" if len(question.split()) > 12 else "")
    sentences = [_OPENINGS[digest % len(_OPENINGS)], f"You asked: “{quoted}”."]
    sentences += [_BODIES[(digest >> 8) % len(_BODIES)], _BODIES[(digest >> 16) % len(_BODIES)]]
    words = " ".join(dict.fromkeys(sentences)).split()
    return [word + " " for word in words[:-1]] + words[-1:]


def _openai_usage(prompt: int, completion: int) -> dict[str, t.Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


_Event = tuple[str | None, dict[str, t.Any] | str]


def openai_chat(body: dict[str, t.Any], ids: t.Iterator[int]) -> dict[str, t.Any] | list[_Event]:
    """An OpenAI chat completion (a JSON body) or its stream (a list of SSE events)."""
    words = compose_answer(body)
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    finish = "stop"
    if isinstance(cap, int) and 0 < cap < len(words):
        words, finish = words[:cap], "length"
    usage = _openai_usage(prompt_tokens(body), len(words))
    base = {"id": f"chatcmpl-local-{next(ids)}", "created": int(time.time()), "model": str(body.get("model"))}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(words), "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    def chunk(delta: dict[str, t.Any], finish_reason: str | None = None) -> _Event:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return None, {**base, "object": "chat.completion.chunk", "choices": [choice]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in words]
    events.append(chunk({}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return events


def anthropic_messages(body: dict[str, t.Any], ids: t.Iterator[int]) -> dict[str, t.Any] | list[_Event]:
    """An Anthropic message (a JSON body) or its stream (a list of SSE events)."""
    words = compose_answer(body)
    cap = body.get("max_tokens")
    stop = "end_turn"
    if isinstance(cap, int) and 0 < cap < len(words):
        words, stop = words[:cap], "max_tokens"
    usage = {
        "input_tokens": prompt_tokens(body),
        "output_tokens": len(words),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    message = {
        "id": f"msg_local_{next(ids)}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model")),
        "content": [{"type": "text", "text": "".join(words)}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    if not body.get("stream"):
        return message
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    delta = {"stop_reason": stop, "stop_sequence": None}
    events: list[dict[str, t.Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}} for w in words),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": delta, "usage": usage},
        {"type": "message_stop"},
    ]
    # Each event is named after its type, as Anthropic sends them.
    return [(str(event["type"]), event) for event in events]


class LocalModelServer:
    """The server on ``127.0.0.1`` (port 0: a free one), served by a daemon thread."""

    def __init__(self, port: int = 0, delay: float = DEFAULT_DELAY) -> None:
        self.delay = delay
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: Anthropic's ``base_url``; OpenAI's is this plus ``/v1``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> LocalModelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def answer(self, path: str, body: dict[str, t.Any]) -> tuple[int, dict[str, t.Any] | list[_Event]]:
        if path == "/v1/chat/completions":
            return 200, openai_chat(body, self._ids)
        if path == "/v1/messages":
            return 200, anthropic_messages(body, self._ids)
        return 404, {"error": {"type": "not_found_error", "message": f"The local model server has no {path}"}}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: LocalModelServer

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        """A browser tab closed mid-answer hangs up on us: expected, not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: the SDKs keep connections alive and streams use chunked encoding.
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle's algorithm the body waited 40 ms for an ACK.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: t.Any) -> None:
        """Quiet: the Flask log already shows every chat."""

    def do_GET(self) -> None:
        self._send_json(200, {"status": "ok", "routes": ["/v1/chat/completions", "/v1/messages"]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(400, {"error": {"type": "invalid_request_error", "message": "Send a JSON object."}})
            return
        status, reply = self.server.owner.answer(self.path.split("?", 1)[0], body)
        try:
            if isinstance(reply, list):
                self._send_stream(reply)
            else:
                self._send_json(status, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_json(self, status: int, reply: dict[str, t.Any]) -> None:
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_stream(self, events: list[_Event]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        delay = self.server.owner.delay
        for index, (name, data) in enumerate(events):
            if index and delay:
                time.sleep(delay)
            text = data if isinstance(data, str) else json.dumps(data)
            encoded = ((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(encoded), encoded))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The demo's local OpenAI/Anthropic-compatible model server.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY, help="seconds between streamed words")
    args = parser.parse_args(argv)
    server = LocalModelServer(args.port, args.delay)
    print(f"Local model server on {server.url} (OpenAI base_url {server.url}/v1). Ctrl-C stops it.")
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
