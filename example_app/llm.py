"""The chat's models: the official SDK clients, instrumented once, and a streaming reply.

Each provider's client is built the first time a chat needs it and instrumented
with ``meter.instrument(client)``: from then on every call on it is metered, with
no change at the call site. The billable (the user's team) and the user come from
the app's resolvers on each request; the feature comes from the view's
``with meter.scope(feature="chat")``.

Which service answers:

* ``OPENAI_API_KEY`` set: OpenAI itself; else the local model server.
* ``ANTHROPIC_API_KEY`` set: Anthropic itself; else the local model server.

The local model server (:mod:`example_app.model_server`) starts on a daemon thread
on a free 127.0.0.1 port the first time it is needed, in the same process as the
app, so it stops when ``flask run`` stops and there is no port to pick or process
to clean up. Set ``EXAMPLE_MODEL_SERVER_URL`` to use one you run yourself.
"""

from __future__ import annotations

import dataclasses
import threading
import typing as t

import anthropic
import openai
from flask import Flask
from flask import current_app

from .extensions import meter
from .model_server import LocalModelServer

#: The most an answer may take; also what each call holds against the quota.
MAX_TOKENS = 400
SYSTEM = "You are a concise, friendly assistant inside the flask-ai-metering demo app."


@dataclasses.dataclass(frozen=True)
class Model:
    key: str
    provider: str
    label: str


#: The model picker, in order: the first is the default.
MODELS = {
    m.key: m
    for m in (
        Model("gpt-4o-mini", "openai", "GPT-4o mini · OpenAI"),
        Model("claude-haiku-4-5", "anthropic", "Claude Haiku 4.5 · Anthropic"),
    )
}

_local_lock = threading.Lock()
_local: LocalModelServer | None = None


def local_server_url(app: Flask) -> str:
    """The local model server's URL: ``EXAMPLE_MODEL_SERVER_URL``, or one started on a thread now."""
    global _local
    configured = app.config.get("EXAMPLE_MODEL_SERVER_URL")
    if configured:
        return str(configured).rstrip("/")
    with _local_lock:
        if _local is None:
            _local = LocalModelServer().start()
            app.logger.info("No API key set: the local model server answers at %s", _local.url)
        return _local.url


class Clients:
    """One instrumented SDK client per provider for an app, built on first use."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._clients: dict[str, t.Any] = {}

    def uses_local_server(self, provider: str) -> bool:
        return not self.app.config.get(f"{provider.upper()}_API_KEY")

    def get(self, provider: str) -> t.Any:
        with self._lock:
            if provider not in self._clients:
                self._clients[provider] = meter.instrument(self._build(provider))
            return self._clients[provider]

    def close(self) -> None:
        """Close the clients' connection pools (a server process simply exits; tests close them)."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def _build(self, provider: str) -> t.Any:
        key = self.app.config.get(f"{provider.upper()}_API_KEY")
        if provider == "openai":
            if key:
                return openai.OpenAI(api_key=key)
            return openai.OpenAI(base_url=f"{local_server_url(self.app)}/v1", api_key="local-demo", max_retries=0)
        if key:
            return anthropic.Anthropic(api_key=key)
        return anthropic.Anthropic(base_url=local_server_url(self.app), api_key="local-demo", max_retries=0)


def clients() -> Clients:
    return t.cast(Clients, current_app.extensions["example_llm"])


def conversation(history: t.Any, message: str) -> list[dict[str, str]]:
    """The last turns plus the new message, in the strict user/assistant alternation both APIs accept."""
    turns: list[dict[str, str]] = []
    for item in (history if isinstance(history, list) else [])[-10:]:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            continue
        content = str(item.get("content") or "").strip()[:4000]
        if not content:
            continue
        if turns and turns[-1]["role"] == item["role"]:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": str(item["role"]), "content": content})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if turns and turns[-1]["role"] == "user":
        turns.pop()  # its answer never came: ask again below
    return [*turns, {"role": "user", "content": message}]


def stream_reply(model: Model, messages: list[dict[str, str]]) -> t.Iterator[str]:
    """Start a streamed answer now and return an iterator over its text.

    The request is made before this returns, so a quota refusal (``AiLimitExceeded``,
    raised by the instrumented client before anything is sent) reaches the view.
    The usage is committed when the stream ends or is closed.
    """
    client = clients().get(model.provider)
    if model.provider == "openai":
        stream = client.chat.completions.create(
            model=model.key,
            messages=[{"role": "system", "content": SYSTEM}, *messages],
            max_completion_tokens=MAX_TOKENS,
            stream=True,
        )

        def openai_text() -> t.Iterator[str]:
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content

        return openai_text()
    events = client.messages.create(
        model=model.key, system=SYSTEM, messages=messages, max_tokens=MAX_TOKENS, stream=True
    )

    def anthropic_text() -> t.Iterator[str]:
        with events:
            for event in events:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    yield event.delta.text

    return anthropic_text()
