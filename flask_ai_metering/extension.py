"""The ``AiMetering`` extension: registration, and the calls an app makes on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import typing as t
import weakref

from flask import Flask
from flask import current_app
from flask import has_request_context
from werkzeug.local import LocalProxy

from . import meter as pipeline
from . import recording
from . import signals
from .builder import MeterCall
from .config import Settings
from .config import apply_defaults
from .errors import InvalidUsage
from .leases import keeper
from .meter import CallSpec
from .meter import Hold
from .meter import Replay
from .meter import Runtime
from .results import MeterResult
from .storage import Store
from .streams import wrap_stream
from .usage import Extracted
from .usage import TokenCounts
from .validation import attribution_id
from .validation import billable_key

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from .models import Plan
    from .models import Subscription
    from .providers import Provider
    from .quota import LimitCheck
    from .wallets import Wallet

log = logging.getLogger("flask_ai_metering")
R = t.TypeVar("R")


class _AppState:
    """Per-app objects derived from config, built once."""

    def __init__(self, app: Flask, settings: Settings, db: SQLAlchemy) -> None:
        from .group_commit import GroupCommit
        from .group_hold import GroupHold
        from .policy import RecentPolicies
        from .pricing import PriceBook
        from .providers import builtin_providers
        from .providers import load_provider

        self.settings = settings
        self.db = db
        self.prices = PriceBook(settings.providers)
        providers: dict[str, Provider] = builtin_providers()
        for name, entry in settings.providers.items():
            if isinstance(entry, t.Mapping) and entry.get("class"):
                providers[name] = load_provider(name, entry["class"])
        self.providers = providers
        self.recent = RecentPolicies()
        self.commits = GroupCommit()
        self.holds = GroupHold()
        self._store: Store | None = None
        self._driver: t.Any = None
        self._app_ref = weakref.ref(app)

    @property
    def store(self) -> Store:
        if self._store is None:
            engine = self.db.engines[self.settings.bind_key]
            self._store = Store(engine)
        return self._store

    def runtime(self, app: Flask, billing: t.Any = None) -> Runtime:
        """What a metered call needs, from this app's objects (``billing``: another driver)."""
        return Runtime(
            app,
            self.settings,
            self.store,
            self.prices,
            self.providers,
            billing or self.billing,
            self.recent,
            self.commits,
            self.holds,
        )

    @property
    def billing(self) -> t.Any:
        if self._driver is None:
            from .billing import load_driver

            self._driver = load_driver(self.settings.billing_driver, self.store, self.settings)
        return self._driver


class AiMetering:
    """Meter AI calls per billable, enforce plan quotas, and bill for them.

    :param app: the Flask app; or call :meth:`init_app` later.
    :param db: the app's Flask-SQLAlchemy instance (default: ``app.extensions["sqlalchemy"]``).
    :param cli_group: name of the ``flask`` command group; ``None`` registers no commands.
    :param register_dashboard: register the dashboard blueprint
        (also governed by ``AI_METERING_DASHBOARD_ENABLED``).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        cli_group: str | None = "ai-metering",
        register_dashboard: bool = True,
    ) -> None:
        self._db = db
        self.cli_group = cli_group
        self.register_dashboard = register_dashboard
        self._states: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        self._billable_resolver: t.Callable[[], t.Any] = _default_billable
        self._dashboard_authorizer: t.Callable[[t.Any], bool] | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        """Register on ``app``: read and validate config, add the CLI and dashboard.

        Config is read once here; later changes to ``app.config`` are not seen.
        Nothing touches the database here: several processes start from the same
        app factory, so tables are created by ``flask ai-metering db upgrade``.

        :raises ConfigurationError: naming the ``AI_METERING_*`` key that is wrong.
        """
        if "ai_metering" in app.extensions:
            raise RuntimeError(
                "An 'AiMetering' instance is already registered on this app. Import and use that instance instead."
            )
        db = db or self._db or app.extensions.get("sqlalchemy")
        if db is None:
            raise RuntimeError("AiMetering needs Flask-SQLAlchemy: call db.init_app(app) first, or pass db=db.")
        apply_defaults(app)
        settings = Settings.from_config(app.config)
        self._states[app] = _AppState(app, settings, db)
        app.extensions["ai_metering"] = self
        from .migrations import exclude_from_app_migrations

        exclude_from_app_migrations(app)
        if self.cli_group:
            from .cli import cli

            app.cli.add_command(cli, self.cli_group)
        if self.register_dashboard and (settings.dashboard_enabled or settings.stripe_webhook_route):
            from .dashboard import register_dashboard

            register_dashboard(app, self, settings)

    # -- registration ----------------------------------------------------------------

    def billable_resolver(self, fn: t.Callable[[], t.Any]) -> t.Callable[[], t.Any]:
        """Register the function that says who is billed when a call names no billable."""
        self._billable_resolver = fn
        return fn

    def dashboard_authorizer(self, fn: t.Callable[[t.Any], bool]) -> t.Callable[[t.Any], bool]:
        """Register ``fn(user) -> bool`` deciding who may see the dashboard (default: nobody)."""
        self._dashboard_authorizer = fn
        return fn

    # -- internals ---------------------------------------------------------------------

    def _state(self, app: Flask | None = None) -> _AppState:
        app = app or current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._states[app]
        except KeyError:
            raise RuntimeError(
                "The current app is not registered with this 'AiMetering' instance. Did you forget to call 'init_app'?"
            ) from None

    def runtime(self) -> Runtime:
        """Capture what a metered call needs from the current app (call inside an app context).

        :meta private:
        """
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        state = self._state(app)
        return state.runtime(app)

    def settings(self) -> Settings:
        return self._state().settings

    def resolve_billable(self, billable: t.Any = None) -> tuple[str, str]:
        """``(type, id)`` of ``billable``, or of the registered resolver's answer."""
        if billable is None:
            billable = self._billable_resolver()
        return billable_key(billable)

    def _spec(self, rt: Runtime, **kw: t.Any) -> CallSpec:
        from . import validation as v

        user = kw.get("user")
        if user is None and has_request_context():
            user = _authenticated_user()
        tenant = kw.get("tenant")
        if tenant is None and rt.settings.tenant_resolver is not None:
            tenant = rt.settings.tenant_resolver()
        usage = kw.get("usage")
        if usage is not None and not isinstance(usage, TokenCounts):
            usage = TokenCounts.from_mapping(usage)
        provider = v.name(kw.get("provider") or rt.settings.default_provider, "provider", required=True)
        assert provider is not None
        rt.provider(provider)
        return CallSpec(
            billable=self.resolve_billable(kw.get("billable")),
            provider=provider,
            model=v.name(kw.get("model"), "model"),
            user_id=attribution_id(user, "user"),
            tenant_id=attribution_id(tenant, "tenant"),
            feature=v.feature(kw.get("feature"), strict=rt.settings.validate_features),
            meta=v.meta(kw.get("meta"), max_bytes=rt.settings.max_meta_bytes, sanitize=rt.settings.sanitize_metadata),
            idempotency_key=v.idempotency_key(kw.get("idempotency_key")),
            max_tokens=v.max_tokens(kw.get("max_tokens")),
            usage=usage,
            billing_mode=v.billing_mode(kw.get("billing_mode")),
        )

    # -- metering ----------------------------------------------------------------------

    def call(self, fn: t.Callable[[], t.Any], **options: t.Any) -> MeterResult:
        """Run ``fn`` once under quota and record its usage.

        Keyword options (all optional): ``billable``, ``user``, ``tenant``,
        ``provider``, ``model``, ``feature``, ``meta``, ``idempotency_key``,
        ``max_tokens``, ``usage``, ``billing_mode``. The reservation holds
        ``max_tokens`` (else the manual usage's total, else
        ``AI_METERING_DEFAULT_MAX_TOKENS``) and their worst-case cost.

        :raises AiLimitExceeded: a limit refuses the call; ``fn`` did not run.
        :raises CreditsInsufficient: the wallet cannot pay; ``fn`` did not run.
        :raises IdempotencyConflict: the key's first call is still in flight.
        :raises InvalidUsage: bad input; nothing was reserved or recorded.
        """
        rt = self.runtime()
        spec = self._spec(rt, **options)
        if not rt.settings.enabled:
            return MeterResult(fn(), None, None)
        outcome = pipeline.reserve(rt, spec)
        if isinstance(outcome, Replay):
            return self._replayed(rt, spec, outcome)
        keeper.hold(rt.store, outcome.reservation_id, rt.settings.reservation_ttl)
        started = time.perf_counter()
        try:
            response = fn()
        except BaseException as error:
            self._failed(rt, spec, outcome, error)
            raise
        return self._finish(rt, spec, outcome, response, started)

    async def acall(self, fn: t.Callable[[], t.Awaitable[t.Any]], **options: t.Any) -> MeterResult:
        """The async twin of :meth:`call`: ``fn`` returns an awaitable.

        Database work (reserve, commit, release) runs in a worker thread through
        ``asyncio.to_thread`` so it never blocks the event loop; the provider call
        runs on the loop. A cancelled call releases its hold.
        """
        rt = self.runtime()
        spec = self._spec(rt, **options)
        if not rt.settings.enabled:
            return MeterResult(await fn(), None, None)
        reserving = asyncio.ensure_future(asyncio.to_thread(pipeline.reserve, rt, spec))
        try:
            outcome = await asyncio.shield(reserving)
        except asyncio.CancelledError:
            # Cancelled while the reservation was being made: wait for it, then give it back.
            held = await reserving
            if isinstance(held, Hold):
                await asyncio.to_thread(pipeline.release, rt, held)
            raise
        if isinstance(outcome, Replay):
            return await asyncio.to_thread(self._replayed, rt, spec, outcome)
        keeper.hold(rt.store, outcome.reservation_id, rt.settings.reservation_ttl)
        started = time.perf_counter()
        try:
            response = await fn()
        except BaseException as error:
            await asyncio.shield(asyncio.to_thread(self._failed, rt, spec, outcome, error))
            raise
        return await asyncio.to_thread(self._finish, rt, spec, outcome, response, started)

    def _replayed(self, rt: Runtime, spec: CallSpec, replay: Replay) -> MeterResult:
        check = pipeline.current_check(rt, spec.billable)
        return MeterResult(None, replay.usage, check, replayed=True, usage_id=replay.usage_id)

    def _failed(self, rt: Runtime, spec: CallSpec, hold: Hold, error: BaseException) -> None:
        keeper.drop(hold.reservation_id)
        try:
            pipeline.release(rt, hold)
        except Exception:
            log.exception("could not release reservation %s; it expires on its own", hold.reservation_id)
        if isinstance(error, Exception):
            if rt.settings.log_failures:
                log.warning("%s call failed: %s", spec.provider, type(error).__name__)
            signals.provider_call_failed.send(
                rt.app, billable=spec.billable, provider=spec.provider, model=spec.model, error=error
            )

    def _finish(self, rt: Runtime, spec: CallSpec, hold: Hold, response: t.Any, started: float) -> MeterResult:
        provider = rt.provider(spec.provider)
        if provider.is_stream(response):
            result = MeterResult(None, None, None)

            def finish(extracted: Extracted) -> None:
                duration = int((time.perf_counter() - started) * 1000)
                try:
                    recorded = pipeline.commit(rt, spec, hold, extracted, duration_ms=duration)
                finally:
                    keeper.drop(hold.reservation_id)
                result.usage, result.limit, result.usage_id = recorded.usage, recorded.check, recorded.usage_id

            result.response = wrap_stream(response, provider.accumulator(), finish, spec.model)
            return result
        try:
            extracted = provider.extract(response)
            if extracted is None:
                extracted = self._manual(spec)
        except BaseException as error:
            self._failed(rt, spec, hold, error)
            raise
        duration = int((time.perf_counter() - started) * 1000)
        try:
            recorded = pipeline.commit(rt, spec, hold, extracted, duration_ms=duration)
        finally:
            keeper.drop(hold.reservation_id)
        return MeterResult(response, recorded.usage, recorded.check, usage_id=recorded.usage_id)

    @staticmethod
    def _manual(spec: CallSpec) -> Extracted:
        if spec.usage is not None:
            return Extracted(tokens=spec.usage, model=spec.model)
        log.warning(
            "the %s response carried no usage and no usage= was given; recording an estimated zero",
            spec.provider,
        )
        return Extracted(tokens=TokenCounts(), model=spec.model, estimated=True)

    def record(
        self,
        *,
        usage: t.Mapping[str, int] | TokenCounts,
        occurred_at: dt.datetime | None = None,
        **options: t.Any,
    ) -> MeterResult:
        """Record usage that already happened: priced, counted in its period, never refused.

        Takes the attribution options of :meth:`call`. A replayed
        ``idempotency_key`` records nothing and returns ``replayed=True``.
        """
        rt = self.runtime()
        return recording.record_one(rt, self._record_spec(rt, usage, options), occurred_at)

    def record_batch(self, rows: t.Iterable[t.Mapping[str, t.Any]]) -> list[MeterResult]:
        """Record many usages, ``AI_METERING_BATCH_SIZE`` rows per transaction.

        Every row is validated first: one bad row raises :class:`InvalidUsage`
        (naming its index) and nothing is recorded.
        """
        rt = self.runtime()
        items = []
        for index, row in enumerate(rows):
            options = dict(row)
            try:
                usage = options.pop("usage", None)
                if usage is None:
                    usage = {k: options.pop(k) for k in list(options) if k.endswith("_tokens")}
                occurred_at = options.pop("occurred_at", None)
                items.append((self._record_spec(rt, usage, options), occurred_at))
            except InvalidUsage as error:
                raise InvalidUsage(f"rows[{index}]: {error}") from None
        return recording.record_many(rt, items)

    def _record_spec(self, rt: Runtime, usage: t.Any, options: dict[str, t.Any]) -> CallSpec:
        unknown = set(options) - {
            "billable",
            "user",
            "tenant",
            "provider",
            "model",
            "feature",
            "meta",
            "idempotency_key",
            "billing_mode",
        }
        if unknown:
            raise InvalidUsage(f"unknown arguments: {', '.join(sorted(unknown))}")
        return self._spec(rt, usage=usage, **options)

    def check(self, billable: t.Any = None, tokens: int = 0, *, now: dt.datetime | None = None) -> LimitCheck:
        """The billable's :class:`~flask_ai_metering.quota.LimitCheck` now; reserves nothing.

        Allowed while anything remains (``tokens=0``) or while at least ``tokens`` remain.
        """
        from .validation import max_tokens

        return pipeline.current_check(self.runtime(), self.resolve_billable(billable), max_tokens(tokens) or 0, now)

    def expire_reservations(self, *, now: dt.datetime | None = None) -> int:
        """Release reservations past their expiry; returns how many."""
        return pipeline.expire_reservations(self.runtime(), now=now)

    # -- plans and wallets ---------------------------------------------------------------

    def subscribe(self, billable: t.Any, plan: Plan | str, **options: t.Any) -> Subscription:
        """Put ``billable`` on ``plan`` (a ``Plan`` or its slug); move it if already subscribed.

        Options: ``billing_mode`` ("plan" or "credits"), ``stripe_customer_id``,
        ``stripe_subscription_id`` (what webhooks match), ``started_at``, ``renews_at``,
        ``ends_at``, ``trial_ends_at``.
        """
        from .subscriptions import subscribe

        state = self._state()
        return subscribe(self.runtime(), state.db, self.resolve_billable(billable), plan, **options)

    def subscription(self, billable: t.Any) -> Subscription | None:
        """The billable's subscription, if it has one: a fresh read, attached to ``db.session``."""
        from .subscriptions import subscription_of

        return subscription_of(self.runtime(), self._state().db, self.resolve_billable(billable))

    def wallet(self, billable: t.Any) -> Wallet:
        """The billable's credit wallet (created empty on its first top-up)."""
        from .wallets import Wallet

        rt = self.runtime()
        return Wallet(
            rt.store,
            self.resolve_billable(billable),
            currency=rt.settings.currency,
            overdraft=rt.settings.credit_overdraft,
            sender=rt.app,
            max_meta_bytes=rt.settings.max_meta_bytes,
        )

    # -- fluent form ---------------------------------------------------------------------

    def _builder(self) -> MeterCall:
        return MeterCall(self)

    def for_user(self, user: t.Any) -> MeterCall:
        return self._builder().for_user(user)

    def billable(self, billable: t.Any) -> MeterCall:
        return self._builder().billable(billable)

    def for_tenant(self, tenant: t.Any) -> MeterCall:
        return self._builder().for_tenant(tenant)

    def using_provider(self, provider: str, model: str | None = None) -> MeterCall:
        return self._builder().using_provider(provider, model)

    def feature(self, feature: str) -> MeterCall:
        return self._builder().feature(feature)


def _authenticated_user() -> t.Any:
    try:
        from flask_login import current_user
    except ImportError:
        return None
    try:
        if current_user and current_user.is_authenticated:
            return current_user._get_current_object()
    except Exception:  # no login manager registered on this app
        return None
    return None


def _default_billable() -> t.Any:
    """Flask-Login's ``current_user`` when authenticated, else None."""
    return _authenticated_user() if has_request_context() else None


#: The extension registered on the current app.
_ext: AiMetering = LocalProxy(lambda: current_app.extensions["ai_metering"])  # type: ignore[assignment]
