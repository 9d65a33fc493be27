"""Metered streams: pass the provider's chunks through and commit when the stream ends.

The wrapper yields each chunk unchanged and feeds it to the provider's
accumulator. When the stream is exhausted it commits the usage the provider
reported. When it is abandoned early (closed, broken by an error, or garbage
collected) it commits what was reported so far, topped up to an estimate from
the text seen (flagged ``estimated``), and releases the rest of the hold. It never
records a made-up zero: with nothing reported and nothing seen, the usage row
says ``estimated`` and the logs say why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import typing as t

from .usage import Extracted
from .usage import TokenCounts

if t.TYPE_CHECKING:
    from ..providers import StreamAccumulator

log = logging.getLogger("flask_ai_metering")

#: Characters per token for estimates: the usual figure for English text.
CHARS_PER_TOKEN = 4


def settle_usage(acc: StreamAccumulator, *, complete: bool, model: str | None) -> Extracted:
    """What to commit for a stream: the reported usage, or an estimate where it falls short."""
    reported = acc.result()
    estimate = -(-acc.output_chars // CHARS_PER_TOKEN)
    if reported is not None and (complete or reported.tokens.output_tokens >= estimate):
        return reported
    if reported is not None:
        tokens = dataclasses.replace(reported.tokens, output_tokens=estimate)
        return dataclasses.replace(reported, tokens=tokens, estimated=True)
    log.warning(
        "a %s stream reported no usage; recording an estimate of %d output tokens"
        " (for OpenAI pass stream_options={'include_usage': True})",
        "finished" if complete else "abandoned",
        estimate,
    )
    return Extracted(tokens=TokenCounts(output_tokens=estimate), model=model, estimated=True)


class _Finisher:
    """Runs the commit callback exactly once, whichever way the stream ends."""

    def __init__(self, acc: StreamAccumulator, finish: t.Callable[[Extracted], None], model: str | None) -> None:
        self.acc = acc
        self._finish = finish
        self._model = model
        self._done = False
        self._lock = threading.Lock()

    def __call__(self, complete: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._finish(settle_usage(self.acc, complete=complete, model=self._model))


class _StreamProxy:
    """What both stream wrappers share: the SDK stream's other attributes, and a commit at garbage collection."""

    _stream: t.Any
    _finisher: _Finisher

    def __del__(self) -> None:
        try:
            self._finisher(False)
        except Exception:  # pragma: no cover - nothing to raise to from a finalizer
            log.exception("could not commit the usage of an abandoned stream")

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._stream, name)


class MeteredStream(_StreamProxy):
    """A sync stream that commits its usage when it ends."""

    def __init__(self, stream: t.Any, finisher: _Finisher) -> None:
        self._stream = stream
        self._iter = iter(stream)
        self._finisher = finisher

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> t.Any:
        try:
            chunk = next(self._iter)
        except StopIteration:
            self._finisher(True)
            raise
        except BaseException:
            self._finisher(False)
            raise
        self._finisher.acc.feed(chunk)
        return chunk

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._finisher(False)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeteredStream(_StreamProxy):
    """An async stream that commits its usage (in a worker thread) when it ends."""

    def __init__(self, stream: t.Any, finisher: _Finisher) -> None:
        self._stream = stream
        self._iter = stream.__aiter__()
        self._finisher = finisher

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def __anext__(self) -> t.Any:
        try:
            chunk = await self._iter.__anext__()
        except StopAsyncIteration:
            await asyncio.to_thread(self._finisher, True)
            raise
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._finisher, False))
            raise
        self._finisher.acc.feed(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            close = getattr(self._stream, "close", None) or getattr(self._stream, "aclose", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        finally:
            await asyncio.to_thread(self._finisher, False)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def wrap_stream(
    stream: t.Any, acc: StreamAccumulator, finish: t.Callable[[Extracted], None], model: str | None
) -> MeteredStream | AsyncMeteredStream:
    finisher = _Finisher(acc, finish, model)
    if hasattr(stream, "__aiter__"):
        return AsyncMeteredStream(stream, finisher)
    return MeteredStream(stream, finisher)
