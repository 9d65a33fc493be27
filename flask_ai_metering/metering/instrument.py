"""Drop-in metering of SDK clients: ``meter.instrument(client)`` and ``meter.scope(feature=...)``.

``instrument`` takes an ``openai.OpenAI``/``AsyncOpenAI`` or ``anthropic.Anthropic``/
``AsyncAnthropic`` client and returns the same object, still an instance of its class,
with these methods metered through :meth:`AiMetering.call` / :meth:`AiMetering.acall`:

==================  ==========================================================
OpenAI              ``chat.completions.create`` (plain and ``stream=True``),
                    ``chat.completions.stream()``, the same two on
                    ``beta.chat.completions`` where the SDK has them,
                    ``responses.create`` (plain and ``stream=True``),
                    ``responses.stream()``, ``embeddings.create``
Anthropic           ``messages.create`` (plain and ``stream=True``),
                    ``messages.stream()``
==================  ==========================================================

and ``with_raw_response.<method>`` for the plain (non-stream) calls above. The
async clients get the same methods, awaited. Everything else on the client
(``with_streaming_response``, ``parse``, ``beta`` Anthropic messages, batches,
files, ...) is left as it was and is not metered; so are clients made from an
instrumented one with ``with_options()``/``copy()``.

How a call is metered:

* Billable, tenant and user come from the registered resolvers at call time (per
  request) unless ``instrument`` was given ``billable=``/``tenant=``. The feature is the
  innermost :func:`scope`'s, else the ``feature=`` given to ``instrument``.
* Provider is ``"openai"`` or ``"anthropic"``, model the request's ``model``.
* The hold (``max_tokens`` of :meth:`AiMetering.call`, the call's whole budget) is
  the request's output cap (``max_completion_tokens``/``max_tokens`` times ``n`` for
  chat, ``max_output_tokens`` for Responses, ``max_tokens`` for Anthropic, 0 for
  embeddings; ``AI_METERING_DEFAULT_MAX_TOKENS`` when the request sets none) plus
  :func:`estimate_prompt_tokens`, an offline estimate: no tokenizer is downloaded.
* A refusal (``AiLimitExceeded``, ``CreditsInsufficient``) raises before the
  request leaves the process; the SDK is never called.
* Results are the SDK's own objects. A stream comes back as a thin proxy that
  yields the SDK's own chunks (and forwards ``response``, ``close()``, ``with``);
  the ``.stream()`` helpers return the SDK's own stream object, whose raw stream
  underneath is metered, so ``text_stream``, ``get_final_message()`` and
  ``get_final_completion()`` all count. Usage is committed when the stream ends
  or is closed (leaving its ``with`` block closes it).
* An OpenAI chat stream whose caller did not ask for usage is sent with
  ``stream_options={"include_usage": True}`` so the usage recorded is the
  provider's, not an estimate; the usage-only last chunk (``choices=[]``) is then
  hidden from the caller, whose loop over ``chunk.choices[0]`` keeps working.
* ``Idempotency-Key`` in the SDK's ``extra_headers`` (any case) becomes the call's
  ``idempotency_key``. A key already recorded does not call the provider again, and
  there is no response object to return, so the call raises
  :class:`IdempotentReplay` (a subclass of ``IdempotencyConflict``) carrying the
  first call's :class:`~flask_ai_metering.MeterResult` in ``.result``. A key still
  in flight raises ``IdempotencyConflict`` as ``meter.call`` does.

Instrumenting a client again with the same ``AiMetering`` keeps one layer of
metering and takes the new ``feature``/``billable``/``tenant``; ``uninstrument``
puts the SDK's own methods back. The wrappers are attributes set on the client's
resource objects (``client.chat.completions.create`` ...); the classes are not
touched, so other clients are unaffected.
"""

from __future__ import annotations

import collections.abc
import contextvars
import functools
import inspect
import logging
import sys
import typing as t

from ..errors import IdempotencyConflict
from ..validation import max_cost as check_max_cost

if t.TYPE_CHECKING:
    from ..extension import AiMetering
    from .calls import MeterResult

log = logging.getLogger("flask_ai_metering")

F = t.TypeVar("F", bound=t.Callable[..., t.Any])

#: Attribute on an instrumented client holding its :class:`Instrumentation`.
MARKER = "_ai_metering_instrumentation"

#: Tokens counted for each message (role, separators) on top of its text.
PER_MESSAGE_TOKENS = 4
#: Tokens counted once per request (the reply's priming).
PER_REQUEST_TOKENS = 3
#: Characters per token: the usual figure for English text.
CHARS_PER_TOKEN = 4
#: A string this long with no whitespace is taken for encoded data (an image in
#: base64, a data URL) and counted as :data:`BLOB_TOKENS` at most, not by length.
BLOB_CHARS = 1_000
#: What one image or file costs at most in the estimate (a large image is ~1,600 tokens).
BLOB_TOKENS = 1_600

_scope_feature: contextvars.ContextVar[str | None] = contextvars.ContextVar("ai_metering_scope_feature", default=None)
#: True while a metered ``.stream()`` helper opens its request: the helper may call
#: the (instrumented) ``create`` itself, which must not meter the request twice.
_in_helper: contextvars.ContextVar[bool] = contextvars.ContextVar("ai_metering_in_helper", default=False)

_OPENAI_METHODS = (
    ("chat.completions", "create", "chat"),
    ("chat.completions", "stream", "chat"),
    ("beta.chat.completions", "create", "chat"),
    ("beta.chat.completions", "stream", "chat"),
    ("responses", "create", "responses"),
    ("responses", "stream", "responses"),
    ("embeddings", "create", "embeddings"),
)
_ANTHROPIC_METHODS = (
    ("messages", "create", "messages"),
    ("messages", "stream", "messages"),
)
#: The request fields whose text is part of the prompt, per kind of call.
_PROMPT_FIELDS = {
    "chat": ("messages", "tools", "functions"),
    "responses": ("instructions", "input", "tools"),
    "messages": ("system", "messages", "tools"),
    "embeddings": ("input",),
}
#: Cached ``with_raw_response``/``with_streaming_response`` objects capture the
#: resource's methods when built: dropped on (un)instrumenting so they are rebuilt.
_CACHED_WRAPPERS = ("with_raw_response", "with_streaming_response")
_RAW_HEADER = "x-stainless-raw-response"
_warned_unmetered: set[str] = set()


class IdempotentReplay(IdempotencyConflict):
    """An instrumented call reused an ``Idempotency-Key`` that was already recorded.

    The provider was not called again and there is no response object to return;
    ``result`` is the replayed :class:`~flask_ai_metering.MeterResult` (``replayed=True``,
    the first call's ``usage`` and ``usage_id``).
    """

    def __init__(self, key: str | None, result: MeterResult) -> None:
        super().__init__(
            f"idempotency key {key!r} was already recorded (usage #{result.usage_id});"
            " the provider was not called again and there is no response to return"
        )
        self.key = key
        self.result = result


# -- feature scope -------------------------------------------------------------------------


def current_scope_feature() -> str | None:
    """The feature set by the innermost :class:`FeatureScope` in this context, if any."""
    return _scope_feature.get()


class FeatureScope:
    """``with meter.scope(feature="chat"):`` or ``@meter.scope(feature="chat")``.

    Sets the feature of metered calls made inside it (instrumented clients, and
    ``meter.call`` without ``feature=``) through a context variable, so it follows
    the request's thread or task. As a decorator it works on plain and ``async``
    functions; each call gets its own scope.
    """

    def __init__(self, feature: str | None) -> None:
        self.feature = feature
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> FeatureScope:
        self._tokens.append(_scope_feature.set(self.feature))
        return self

    def __exit__(self, *exc: object) -> None:
        _scope_feature.reset(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        feature = self.feature
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: t.Any, **kwargs: t.Any) -> t.Any:
                with FeatureScope(feature):
                    return await fn(*args, **kwargs)

            return t.cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
            with FeatureScope(feature):
                return fn(*args, **kwargs)

        return t.cast(F, run)


# -- reading the request ---------------------------------------------------------------------


def _given(value: t.Any) -> t.Any:
    """``value``, or ``None`` for the SDKs' "not given" sentinels (``Omit``, ``NotGiven``)."""
    if type(value).__name__ in ("Omit", "NotGiven"):
        return None
    return value


def _count(value: t.Any) -> int | None:
    value = _given(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def output_cap(kind: str, request: t.Mapping[str, t.Any]) -> int | None:
    """The most output tokens the request allows, or ``None`` when it sets no cap."""
    if kind == "embeddings":
        return 0
    if kind == "chat":
        cap = _count(request.get("max_completion_tokens"))
        return _count(request.get("max_tokens")) if cap is None else cap
    if kind == "responses":
        return _count(request.get("max_output_tokens"))
    return _count(request.get("max_tokens"))


def _text_tokens(text: str) -> int:
    tokens = -(-len(text) // CHARS_PER_TOKEN)
    if len(text) > BLOB_CHARS and not any(c in text for c in " \n\t"):
        return min(tokens, BLOB_TOKENS)
    return tokens


def _tokens_in(value: t.Any) -> int:
    """Estimated tokens of a JSON-like value: its strings (keys too) at 4 characters a token."""
    value = _given(value)
    if value is None:
        return 0
    if isinstance(value, str):
        return _text_tokens(value)
    if isinstance(value, (bytes, bytearray)):
        return min(-(-len(value) // CHARS_PER_TOKEN), BLOB_TOKENS)
    if isinstance(value, (bool, int, float)):
        return 1
    if isinstance(value, t.Mapping):
        return sum(_text_tokens(str(k)) + _tokens_in(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_tokens_in(v) for v in value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _tokens_in(dump())
    return _text_tokens(str(value))


def _embedding_input_tokens(value: t.Any) -> int:
    if isinstance(value, str):
        return _text_tokens(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) for v in value):
            return len(value)  # one input, already tokenised
        return sum(_embedding_input_tokens(v) for v in value)
    return _tokens_in(value)


def estimate_prompt_tokens(kind: str, request: t.Mapping[str, t.Any]) -> int:
    """An offline upper-bound-ish estimate of the request's prompt tokens.

    No tokenizer: the text of the prompt fields (messages or input, system or
    instructions, tool definitions; keys included) at :data:`CHARS_PER_TOKEN`
    characters a token, plus :data:`PER_MESSAGE_TOKENS` per message and
    :data:`PER_REQUEST_TOKENS` per request; a long run of non-whitespace (an
    image or file in base64) counts :data:`BLOB_TOKENS` at most; token arrays
    given to embeddings count one per token. Context the provider adds on its
    side (``previous_response_id``, a conversation, a cached file) is not seen.
    The hold only bounds the call: the usage recorded is what the provider reports.
    """
    if kind == "embeddings":
        return _embedding_input_tokens(_given(request.get("input")))
    total = PER_REQUEST_TOKENS
    for name in _PROMPT_FIELDS[kind]:
        value = _given(request.get(name))
        if value is None:
            continue
        if name in ("messages", "input") and isinstance(value, (list, tuple)):
            total += PER_MESSAGE_TOKENS * len(value)
        total += _tokens_in(value)
    return total


def idempotency_key_of(headers: t.Any) -> str | None:
    """The ``Idempotency-Key`` among the SDK call's ``extra_headers`` (any case), if any."""
    return _header(headers, "idempotency-key")


def _header(headers: t.Any, name: str) -> str | None:
    if not isinstance(headers, t.Mapping):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def _prepare(kind: str, request: dict[str, t.Any], *, streaming: bool) -> tuple[dict[str, t.Any], bool]:
    """The request to send, and whether to hide a usage-only chunk the caller did not ask for.

    One-shot iterators among the prompt fields are made lists, so that estimating
    the prompt does not use them up.
    """
    request = dict(request)
    for name in _PROMPT_FIELDS[kind]:
        value = request.get(name)
        if isinstance(value, collections.abc.Iterator):
            request[name] = list(value)
    hide = False
    if kind == "chat" and streaming:
        options = _given(request.get("stream_options"))
        if not (isinstance(options, t.Mapping) and options.get("include_usage")):
            request["stream_options"] = {**(options if isinstance(options, t.Mapping) else {}), "include_usage": True}
            hide = True
    return request, hide


def _usage_only(chunk: t.Any) -> bool:
    """The last chunk of a chat stream asked for ``include_usage``: no choices, only usage."""
    return not getattr(chunk, "choices", None) and getattr(chunk, "usage", None) is not None


# -- what the caller gets back for a stream ------------------------------------------------


class MeteredSyncStream:
    """What a metered ``stream=True`` call returns: the SDK's chunks, usage committed at the end.

    Wraps :meth:`AiMetering.call`'s stream; ``hide_usage`` drops the usage-only chunk
    the instrumentation asked for. Other attributes (``response``, ...) are the SDK stream's.
    """

    def __init__(self, stream: t.Any, hide_usage: bool) -> None:
        self._stream = stream
        self._hide_usage = hide_usage

    def __iter__(self) -> MeteredSyncStream:
        return self

    def __next__(self) -> t.Any:
        while True:
            chunk = next(self._stream)
            if not (self._hide_usage and _usage_only(chunk)):
                return chunk

    def close(self) -> None:
        """Close the response; usage not committed yet is committed now."""
        self._stream.close()

    def __enter__(self) -> MeteredSyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._stream, name)


class MeteredAsyncStream:
    """The async twin of :class:`MeteredSyncStream`; ``await close()`` commits (in a worker thread)."""

    def __init__(self, stream: t.Any, hide_usage: bool) -> None:
        self._stream = stream
        self._hide_usage = hide_usage

    def __aiter__(self) -> MeteredAsyncStream:
        return self

    async def __anext__(self) -> t.Any:
        while True:
            chunk = await self._stream.__anext__()
            if not (self._hide_usage and _usage_only(chunk)):
                return chunk

    async def close(self) -> None:
        """Close the response; usage not committed yet is committed now."""
        aclose = getattr(self._stream, "aclose", None)
        await (aclose() if aclose is not None else self._stream.close())

    aclose = close

    async def __aenter__(self) -> MeteredAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._stream, name)


class _RawParsed:
    """A ``with_raw_response`` result seen through its parsed body, so its usage can be read.

    The SDKs cache ``parse()``: the caller's own ``parse()`` gets the same object.
    """

    def __init__(self, raw: t.Any, parsed: t.Any) -> None:
        self.raw = raw
        self.usage = getattr(parsed, "usage", None)
        self.model = getattr(parsed, "model", None)


def _raw_stream_of(helper: t.Any) -> t.Any:
    """The SDK stream a ``.stream()`` helper reads from (the helpers keep it as ``_raw_stream``)."""
    raw = getattr(helper, "_raw_stream", None)
    if raw is None:
        raise TypeError(
            f"flask_ai_metering cannot meter {type(helper).__name__} from this SDK version;"
            " use create(..., stream=True) or meter.call"
        )
    return raw


def _close_pending(manager: t.Any) -> None:
    """Close a request coroutine an async helper made but never awaited (no 'never awaited' warning)."""
    for value in list(vars(manager).values()):
        if inspect.iscoroutine(value):
            value.close()


class _SyncHelper:
    """Stands for a ``.stream()`` helper's manager: meters on ``__enter__``, commits on ``__exit__``."""

    def __init__(self, inst: Instrumentation, manager: t.Any, options: t.Callable[[], dict[str, t.Any]], hide: bool):
        self._inst = inst
        self._manager = manager
        self._options = options
        self._hide = hide
        self._stream: MeteredSyncStream | None = None

    def __enter__(self) -> t.Any:
        opened: list[t.Any] = []

        def open_stream() -> t.Any:
            token = _in_helper.set(True)
            try:
                helper = self._manager.__enter__()
            finally:
                _in_helper.reset(token)
            opened.append(helper)
            try:
                return _raw_stream_of(helper)
            except TypeError:
                self._manager.__exit__(None, None, None)
                raise

        options = self._options()
        result = self._inst.meter.call(open_stream, **options)
        if result.replayed:
            raise IdempotentReplay(options.get("idempotency_key"), result)
        self._stream = MeteredSyncStream(result.response, self._hide)
        helper = opened[0]
        helper._raw_stream = self._stream
        return helper

    def __exit__(self, *exc: t.Any) -> t.Any:
        try:
            return self._manager.__exit__(*exc)
        finally:
            if self._stream is not None:
                self._stream.close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._manager, name)


class _AsyncHelper:
    """The async twin of :class:`_SyncHelper`."""

    def __init__(self, inst: Instrumentation, manager: t.Any, options: t.Callable[[], dict[str, t.Any]], hide: bool):
        self._inst = inst
        self._manager = manager
        self._options = options
        self._hide = hide
        self._stream: MeteredAsyncStream | None = None

    async def __aenter__(self) -> t.Any:
        opened: list[t.Any] = []

        async def open_stream() -> t.Any:
            token = _in_helper.set(True)
            try:
                helper = await self._manager.__aenter__()
            finally:
                _in_helper.reset(token)
            opened.append(helper)
            try:
                return _raw_stream_of(helper)
            except TypeError:
                await self._manager.__aexit__(None, None, None)
                raise

        try:
            options = self._options()
            result = await self._inst.meter.acall(open_stream, **options)
        except BaseException:
            _close_pending(self._manager)
            raise
        if result.replayed:
            _close_pending(self._manager)
            raise IdempotentReplay(options.get("idempotency_key"), result)
        self._stream = MeteredAsyncStream(result.response, self._hide)
        helper = opened[0]
        helper._raw_stream = self._stream
        return helper

    async def __aexit__(self, *exc: t.Any) -> t.Any:
        try:
            return await self._manager.__aexit__(*exc)
        finally:
            if self._stream is not None:
                await self._stream.close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._manager, name)


# -- instrumenting a client ----------------------------------------------------------------


class _Patch(t.NamedTuple):
    resource: t.Any
    name: str
    #: The instance attribute the resource had under ``name`` before, if any.
    previous: t.Any
    had_own: bool


class Instrumentation:
    """The metering layer on one client: its options and the methods it replaced."""

    def __init__(
        self,
        meter: AiMetering,
        provider: str,
        is_async: bool,
        *,
        feature: t.Any,
        billable: t.Any,
        tenant: t.Any,
        max_cost: t.Any = None,
    ) -> None:
        self.meter = meter
        self.provider = provider
        self.is_async = is_async
        self.feature = feature
        self.billable = billable
        self.tenant = tenant
        self.max_cost = max_cost
        self.patches: list[_Patch] = []

    def options(self, kind: str, request: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
        """The :meth:`AiMetering.call` options of one request (resolvers run in ``call``)."""
        cap = output_cap(kind, request)
        if cap is None:
            cap = self.meter.settings().default_max_tokens
        if kind == "chat":
            cap *= max(_count(request.get("n")) or 1, 1)
        model = _given(request.get("model"))
        prompt = estimate_prompt_tokens(kind, request)
        return {
            "billable": self.billable,
            "tenant": self.tenant,
            "feature": current_scope_feature() or self.feature,
            "provider": self.provider,
            "model": model if isinstance(model, str) else None,
            "max_tokens": prompt + cap,
            "prompt_tokens_estimate": prompt,
            "idempotency_key": idempotency_key_of(_given(request.get("extra_headers"))),
            # Only when set: a call with no model then keeps the configured default's rule.
            **({"max_cost": self.max_cost} if self.max_cost is not None else {}),
        }

    def _returned(self, result: MeterResult, options: dict[str, t.Any], *, streaming: bool, hide: bool) -> t.Any:
        if result.replayed:
            raise IdempotentReplay(options.get("idempotency_key"), result)
        if isinstance(result.response, _RawParsed):
            return result.response.raw
        if streaming:
            stream_cls = MeteredAsyncStream if self.is_async else MeteredSyncStream
            return stream_cls(result.response, hide)
        return result.response

    def _unmetered(self, kind: str, request: t.Mapping[str, t.Any]) -> bool:
        """Calls passed through as they are: inside a metered helper, or raw streaming forms."""
        if _in_helper.get():
            return True
        raw = _header(_given(request.get("extra_headers")), _RAW_HEADER)
        if raw is None or (raw in ("true", "raw") and request.get("stream") is not True):
            return False
        if kind not in _warned_unmetered:
            _warned_unmetered.add(kind)
            log.warning("with_streaming_response and raw streams are not metered by meter.instrument (%s)", kind)
        return True

    def _wrap(self, kind: str, name: str, original: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        if name == "stream":
            return self._wrap_helper(kind, original)
        if self.is_async:

            @functools.wraps(original)
            async def acreate(*args: t.Any, **kwargs: t.Any) -> t.Any:
                if self._unmetered(kind, kwargs):
                    return await original(*args, **kwargs)
                streaming = kwargs.get("stream") is True
                request, hide = _prepare(kind, kwargs, streaming=streaming)
                options = self.options(kind, request)
                raw = _header(_given(request.get("extra_headers")), _RAW_HEADER) is not None

                async def send() -> t.Any:
                    response = await original(*args, **request)
                    if not raw:
                        return response
                    parsed = response.parse()
                    return _RawParsed(response, await parsed if inspect.isawaitable(parsed) else parsed)

                result = await self.meter.acall(send, **options)
                return self._returned(result, options, streaming=streaming, hide=hide)

            return acreate

        @functools.wraps(original)
        def create(*args: t.Any, **kwargs: t.Any) -> t.Any:
            if self._unmetered(kind, kwargs):
                return original(*args, **kwargs)
            streaming = kwargs.get("stream") is True
            request, hide = _prepare(kind, kwargs, streaming=streaming)
            options = self.options(kind, request)
            raw = _header(_given(request.get("extra_headers")), _RAW_HEADER) is not None

            def send() -> t.Any:
                response = original(*args, **request)
                return _RawParsed(response, response.parse()) if raw else response

            result = self.meter.call(send, **options)
            return self._returned(result, options, streaming=streaming, hide=hide)

        return create

    def _wrap_helper(self, kind: str, original: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        helper_cls = _AsyncHelper if self.is_async else _SyncHelper

        @functools.wraps(original)
        def stream(*args: t.Any, **kwargs: t.Any) -> t.Any:
            if _in_helper.get() or _given(kwargs.get("response_id")) is not None:
                # Nested, or resuming a stored Responses stream: nothing new is generated here.
                return original(*args, **kwargs)
            request, hide = _prepare(kind, kwargs, streaming=True)
            manager = original(*args, **request)
            return helper_cls(self, manager, lambda: self.options(kind, request), hide)

        return stream

    def apply(self, client: t.Any) -> None:
        table = _OPENAI_METHODS if self.provider == "openai" else _ANTHROPIC_METHODS
        seen: set[tuple[int, str]] = set()
        for path, name, kind in table:
            resource = _resolve(client, path)
            if resource is None or not callable(getattr(resource, name, None)) or (id(resource), name) in seen:
                continue
            seen.add((id(resource), name))
            own = vars(resource)
            patch = _Patch(resource, name, own.get(name), name in own)
            setattr(resource, name, self._wrap(kind, name, getattr(resource, name)))
            self.patches.append(patch)
            for cached in _CACHED_WRAPPERS:
                own.pop(cached, None)

    def restore(self) -> None:
        for patch in reversed(self.patches):
            own = vars(patch.resource)
            if patch.had_own:
                own[patch.name] = patch.previous
            else:
                own.pop(patch.name, None)
            for cached in _CACHED_WRAPPERS:
                own.pop(cached, None)
        self.patches.clear()


def _resolve(client: t.Any, path: str) -> t.Any:
    obj = client
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:  # an SDK version without this resource
            return None
    return obj


def _client_kind(client: t.Any) -> tuple[str, bool]:
    """``(provider, is_async)`` of an SDK client; ``TypeError`` for anything else."""
    openai = sys.modules.get("openai")
    if openai is not None:
        if isinstance(client, openai.OpenAI):
            return "openai", False
        if isinstance(client, openai.AsyncOpenAI):
            return "openai", True
    anthropic = sys.modules.get("anthropic")
    if anthropic is not None:
        if isinstance(client, anthropic.Anthropic):
            return "anthropic", False
        if isinstance(client, anthropic.AsyncAnthropic):
            return "anthropic", True
    raise TypeError(
        "meter.instrument takes an openai.OpenAI, openai.AsyncOpenAI, anthropic.Anthropic"
        f" or anthropic.AsyncAnthropic client, not {type(client).__name__}"
    )


def instrument(
    meter: AiMetering,
    client: t.Any,
    *,
    feature: str | None = None,
    billable: t.Any = None,
    tenant: t.Any = None,
    max_cost: t.Any = None,
) -> t.Any:
    """Meter ``client``'s calls through ``meter``; returns ``client`` itself. See the module docs.

    Instrumenting an instrumented client again keeps one layer and takes the new
    options; a client instrumented by another ``AiMetering`` raises ``ValueError``.
    """
    provider, is_async = _client_kind(client)
    max_cost = check_max_cost(max_cost)
    current = vars(client).get(MARKER)
    if isinstance(current, Instrumentation):
        if current.meter is not meter:
            raise ValueError("this client is already instrumented by another AiMetering instance")
        current.feature, current.billable, current.tenant = feature, billable, tenant
        current.max_cost = max_cost
        return client
    inst = Instrumentation(
        meter, provider, is_async, feature=feature, billable=billable, tenant=tenant, max_cost=max_cost
    )
    inst.apply(client)
    setattr(client, MARKER, inst)
    return client


def uninstrument(client: t.Any) -> t.Any:
    """Put the SDK's own methods back on ``client``; returns it. Harmless if it was not instrumented."""
    current = vars(client).pop(MARKER, None)
    if isinstance(current, Instrumentation):
        current.restore()
    return client
