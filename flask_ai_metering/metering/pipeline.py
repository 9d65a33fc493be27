"""The metered call, top to bottom: reserve → call → extract → price → commit (or release).

Each database phase is one short transaction of its own on the app's engine;
no transaction is held open across the provider call. :func:`run` is
``meter.call``; :func:`arun` is ``meter.acall``, which runs the database phases
in a worker thread so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import typing as t

from .. import observability
from .. import signals
from ..providers.base import response_text
from ..quota.leases import keeper
from ..quota.standing import current_check
from .calls import MeterResult
from .commits import commit
from .failures import describe
from .failures import record_failure
from .holds import release
from .holds import reserve
from .spec import Hold
from .spec import Replay
from .streams import CHARS_PER_TOKEN
from .streams import wrap_stream
from .usage import Extracted
from .usage import TokenCounts

if t.TYPE_CHECKING:
    from ..runtime import Runtime
    from .spec import CallSpec
    from .spec import Recorded

log = logging.getLogger("flask_ai_metering")


def run(rt: Runtime, spec: CallSpec, fn: t.Callable[[], t.Any]) -> MeterResult:
    """Run ``fn`` once under quota and record its usage (``meter.call``)."""
    if not rt.settings.enabled:
        return MeterResult(fn(), None, None)
    outcome = reserve(rt, spec)
    if isinstance(outcome, Replay):
        return replayed(rt, spec, outcome)
    keeper.hold(rt.store, outcome.reservation_id, rt.settings.reservation_ttl)
    started = time.perf_counter()
    try:
        response = fn()
    except BaseException as error:
        failed(rt, spec, outcome, error, started)
        raise
    return finish(rt, spec, outcome, response, started)


async def arun(rt: Runtime, spec: CallSpec, fn: t.Callable[[], t.Awaitable[t.Any]]) -> MeterResult:
    """The async twin of :func:`run`: ``fn`` returns an awaitable (``meter.acall``).

    A call cancelled while its hold is being made waits for the hold, then gives it back.
    """
    if not rt.settings.enabled:
        return MeterResult(await fn(), None, None)
    reserving = asyncio.ensure_future(asyncio.to_thread(reserve, rt, spec))
    try:
        outcome = await asyncio.shield(reserving)
    except asyncio.CancelledError:
        held = await reserving
        if isinstance(held, Hold):
            await asyncio.to_thread(release, rt, held)
        raise
    if isinstance(outcome, Replay):
        return await asyncio.to_thread(replayed, rt, spec, outcome)
    keeper.hold(rt.store, outcome.reservation_id, rt.settings.reservation_ttl)
    started = time.perf_counter()
    try:
        response = await fn()
    except BaseException as error:
        await asyncio.shield(asyncio.to_thread(failed, rt, spec, outcome, error, started))
        raise
    return await asyncio.to_thread(finish, rt, spec, outcome, response, started)


def replayed(rt: Runtime, spec: CallSpec, replay: Replay) -> MeterResult:
    """The result of a recorded key: the first call's usage, the provider not called again."""
    check = current_check(rt, spec.billable)
    return MeterResult(None, replay.usage, check, replayed=True, usage_id=replay.usage_id)


def failed(rt: Runtime, spec: CallSpec, hold: Hold, error: BaseException, started: float) -> None:
    """The provider call raised: give the hold back (the key is freed for a retry), record it, say so."""
    described = describe(error, started)
    keeper.drop(hold.reservation_id)
    try:
        release(rt, hold)
    except Exception:
        log.exception("could not release reservation %s; it expires on its own", hold.reservation_id)
    if isinstance(error, Exception):
        record_failure(rt, spec, described)
        if rt.settings.log_failures:
            log.warning("%s call failed: %s", spec.provider, type(error).__name__)
        signals.provider_call_failed.send(
            rt.app, billable=spec.billable, provider=spec.provider, model=spec.model, error=error
        )
        observability.call_failed(rt, spec, hold, described)


def finish(rt: Runtime, spec: CallSpec, hold: Hold, response: t.Any, started: float) -> MeterResult:
    """Extract and commit the usage; a stream commits when it ends (or is abandoned)."""
    provider = rt.provider(spec.provider)
    if provider.is_stream(response):
        result = MeterResult(None, None, None)
        on_end = _StreamCommit(rt, spec, hold, started, result)
        result.response = wrap_stream(response, provider.accumulator(), on_end, spec.model)
        return result
    try:
        extracted = provider.extract(response)
        if extracted is None:
            extracted = manual_usage(spec, response)
    except BaseException as error:
        failed(rt, spec, hold, error, started)
        raise
    recorded = _commit(rt, spec, hold, extracted, started)
    return MeterResult(response, recorded.usage, recorded.check, usage_id=recorded.usage_id)


class _StreamCommit:
    """Commits a stream's usage when the stream ends, into the result the caller holds."""

    def __init__(self, rt: Runtime, spec: CallSpec, hold: Hold, started: float, result: MeterResult) -> None:
        self.rt, self.spec, self.hold, self.started, self.result = rt, spec, hold, started, result

    def __call__(self, extracted: Extracted) -> None:
        recorded = _commit(self.rt, self.spec, self.hold, extracted, self.started, stream=True)
        self.result.usage, self.result.limit, self.result.usage_id = recorded.usage, recorded.check, recorded.usage_id


def _commit(
    rt: Runtime, spec: CallSpec, hold: Hold, extracted: Extracted, started: float, stream: bool = False
) -> Recorded:
    ended = time.perf_counter()
    try:
        extracted = owed(extracted, spec, hold)
        recorded = commit(rt, spec, hold, extracted, duration_ms=int((ended - started) * 1000))
    finally:
        keeper.drop(hold.reservation_id)
    observability.call_ended(rt, spec, hold, extracted, recorded, started=started, ended=ended, stream=stream)
    return recorded


def manual_usage(spec: CallSpec, response: t.Any = None) -> Extracted:
    """The usage of a response that carried none: ``usage=`` if given, else an estimate from its text."""
    if spec.usage is not None:
        return Extracted(tokens=spec.usage, model=spec.model)
    output = -(-len(response_text(response)) // CHARS_PER_TOKEN)
    log.warning(
        "the %s response carried no usage and no usage= was given; recording an estimate",
        spec.provider,
    )
    return Extracted(tokens=TokenCounts(output_tokens=output), model=spec.model, estimated=True)


def owed(extracted: Extracted, spec: CallSpec, hold: Hold) -> Extracted:
    """An estimate never charges less than the prompt plus the output seen.

    A call that reached the provider but reported no input (an abandoned stream, a
    response without usage) is charged the caller's ``prompt_tokens_estimate``, or
    else the rest of its hold: ``max_tokens`` is the call's whole budget, so the
    prompt was at most that. Never 0/0.
    """
    if not extracted.estimated or extracted.tokens.input_tokens:
        return extracted
    output = extracted.tokens.output_tokens
    prompt = spec.prompt_tokens_estimate if spec.prompt_tokens_estimate is not None else max(hold.tokens - output, 0)
    if not prompt:
        return extracted
    return dataclasses.replace(extracted, tokens=dataclasses.replace(extracted.tokens, input_tokens=prompt))
