"""The ``AiMetering`` extension: registration, and the calls an app makes on it."""

from __future__ import annotations

import datetime as dt
import logging
import typing as t
import weakref

import sqlalchemy as sa
from flask import Flask
from flask import current_app
from flask import has_request_context

from . import validation as v
from .billables import BillableTypes
from .billing import load_driver
from .billing.wallets import Wallet
from .billing.webhooks import handle_stripe_webhook
from .cli import cli
from .config import Settings
from .config import apply_defaults
from .dashboard import register_dashboard
from .errors import InvalidUsage
from .metering import pipeline
from .metering import recording
from .metering import refunds
from .metering.calls import MeterCall
from .metering.calls import MeterResult
from .metering.fast_path import choose_fast_path
from .metering.instrument import FeatureScope
from .metering.instrument import current_scope_feature
from .metering.instrument import instrument as _instrument
from .metering.instrument import uninstrument as _uninstrument
from .metering.refunds import Refund
from .metering.spec import CallSpec
from .metering.spec import build_spec
from .metering.spec import check_record_options
from .metering.sweeper import expire_reservations
from .metering.usage import TokenCounts
from .models import Budget
from .observability import build_observers
from .ops.schema import exclude_from_app_migrations
from .pricing import PriceBook
from .providers import builtin_providers
from .providers import load_provider
from .quota import budgets
from .quota.standing import current_check
from .quota.subscriptions import attach
from .quota.subscriptions import subscribe
from .quota.subscriptions import subscription_of
from .quota.trials import TrialNotices
from .quota.trials import check_trials
from .runtime import Runtime
from .transactions import Transactions

if t.TYPE_CHECKING:
    from decimal import Decimal

    from flask_sqlalchemy import SQLAlchemy

    from .billing import BillingDriver
    from .metering.fast_path import FastPath
    from .models import Plan
    from .models import Subscription
    from .providers import Provider
    from .quota.engine import LimitCheck

log = logging.getLogger("flask_ai_metering")
#: An SDK client given to :meth:`AiMetering.instrument`, returned as it came.
Client = t.TypeVar("Client")


class _AppState:
    """Per-app objects derived from config, built once."""

    def __init__(self, app: Flask, settings: Settings, db: SQLAlchemy) -> None:
        self.settings = settings
        self.db = db
        self.prices = PriceBook(settings.providers)
        providers: dict[str, Provider] = builtin_providers()
        for name, entry in settings.providers.items():
            if isinstance(entry, t.Mapping) and entry.get("class"):
                providers[name] = load_provider(name, entry["class"])
        self.providers = providers
        self.observers = build_observers(settings)
        self.billables = BillableTypes(db, settings.billable_aliases)
        self._store: Transactions | None = None
        self._fast: FastPath | None = None
        self._driver: BillingDriver | None = None

    @property
    def store(self) -> Transactions:
        # The engine exists only inside an app context, so the store and the dialect's
        # fast path are made on first use, once per app.
        if self._store is None:
            self._store = Transactions(self.db.engines[self.settings.bind_key])
            self._fast = choose_fast_path(self._store)
        return self._store

    def runtime(self, app: Flask, billing: BillingDriver | None = None) -> Runtime:
        """What a metered call needs, from this app's objects (``billing``: another driver)."""
        store = self.store
        assert self._fast is not None
        return Runtime(
            app, self.settings, store, self.prices, self.providers, billing or self.billing, self._fast, self.observers
        )

    @property
    def billing(self) -> BillingDriver:
        if self._driver is None:
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
        self._aliases: dict[str, str] = {}
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
        state = _AppState(app, settings, db)
        for alias, target in self._aliases.items():
            state.billables.add_alias(alias, target)
        self._states[app] = state
        app.extensions["ai_metering"] = self
        exclude_from_app_migrations(app)
        if self.cli_group:
            app.cli.add_command(cli, self.cli_group)
        if self.register_dashboard and (settings.dashboard_enabled or settings.stripe_webhook_route):
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
        """``(type, id)`` of ``billable``, or of the registered resolver's answer, canonicalised.

        A model instance is its class name and primary key; a tuple whose type is a model's
        name in another case, or an alias, is stored under the model's name (see
        :mod:`flask_ai_metering.billables`).
        """
        if billable is None:
            billable = self._billable_resolver()
        return self._state().billables.key(billable)

    def billable_alias(self, alias: str, target: str) -> None:
        """Store billables given as ``(alias, id)`` (any case) as ``(target, id)``.

        For a type that is no model's name (``meter.billable_alias("org", "Team")``); a
        model's own name in another case needs no alias. Applies to every app this
        extension serves, and to apps initialised later.
        """
        for state in self._states.values():
            state.billables.add_alias(alias, target)
        self._aliases[alias] = target

    def _spec(self, rt: Runtime, **options: t.Any) -> CallSpec:
        """Resolve who is billed and attributed (per request), then validate the options."""
        user = options.pop("user", None)
        if user is None and has_request_context():
            user = _authenticated_user()
        tenant = options.pop("tenant", None)
        if tenant is None and rt.settings.tenant_resolver is not None:
            tenant = rt.settings.tenant_resolver()
        billable = self.resolve_billable(options.pop("billable", None))
        if options.get("feature") is None:
            options["feature"] = current_scope_feature()
        return build_spec(rt, billable, user=user, tenant=tenant, **options)

    # -- metering ----------------------------------------------------------------------

    def call(self, fn: t.Callable[[], t.Any], **options: t.Any) -> MeterResult:
        """Run ``fn`` once under quota and record its usage.

        Keyword options (all optional): ``billable``, ``user``, ``tenant``,
        ``provider``, ``model``, ``feature``, ``meta``, ``idempotency_key``,
        ``max_tokens``, ``usage``, ``billing_mode``, ``max_cost``. The reservation holds
        ``max_tokens`` (else the manual usage's total, else
        ``AI_METERING_DEFAULT_MAX_TOKENS``) and their worst-case cost; a worst case
        above ``max_cost`` (else ``AI_METERING_MAX_COST_PER_CALL``) is refused.

        :raises AiLimitExceeded: a limit refuses the call; ``fn`` did not run.
        :raises CreditsInsufficient: the wallet cannot pay; ``fn`` did not run.
        :raises CostCapExceeded: the worst-case cost is above the cap; ``fn`` did not run.
        :raises IdempotencyConflict: the key's first call is still in flight.
        :raises InvalidUsage: bad input; nothing was reserved or recorded.
        """
        rt = self.runtime()
        return pipeline.run(rt, self._spec(rt, **options), fn)

    async def acall(self, fn: t.Callable[[], t.Awaitable[t.Any]], **options: t.Any) -> MeterResult:
        """The async twin of :meth:`call`: ``fn`` returns an awaitable.

        Database work (reserve, commit, release) runs in a worker thread through
        ``asyncio.to_thread`` so it never blocks the event loop; the provider call
        runs on the loop. A cancelled call releases its hold.
        """
        rt = self.runtime()
        return await pipeline.arun(rt, self._spec(rt, **options), fn)

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
        check_record_options(options)
        return recording.record_one(rt, self._spec(rt, usage=usage, **options), occurred_at)

    def record_batch(self, rows: t.Iterable[t.Mapping[str, t.Any]]) -> list[MeterResult]:
        """Record many usages in one transaction: all of them or none.

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
                check_record_options(options)
                items.append((self._spec(rt, usage=usage, **options), occurred_at))
            except InvalidUsage as error:
                raise InvalidUsage(f"rows[{index}]: {error}") from None
        return recording.record_many(rt, items)

    def check(self, billable: t.Any = None, tokens: int = 0, *, now: dt.datetime | None = None) -> LimitCheck:
        """The billable's :class:`~flask_ai_metering.quota.LimitCheck` now; reserves nothing.

        Allowed while anything remains (``tokens=0``) or while at least ``tokens`` remain.
        """
        return current_check(self.runtime(), self.resolve_billable(billable), v.max_tokens(tokens) or 0, now)

    def expire_reservations(self, *, now: dt.datetime | None = None) -> int:
        """Release reservations past their expiry; returns how many."""
        return expire_reservations(self.runtime(), now=now)

    def refund(
        self,
        usage_id: int,
        *,
        reason: str,
        tokens: int | None = None,
        cost: Decimal | str | int | None = None,
        idempotency_key: str | None = None,
    ) -> Refund:
        """Give a call's tokens and cost back through an adjustment in the ledger.

        Without ``tokens`` and ``cost`` everything not refunded yet is given back;
        with either, exactly that (the other is 0). The counter of the call's period
        gets it back while that period runs, a wallet is credited in credits mode, and
        the call's overage is reduced (or credited on the invoice once synced). A
        replay of ``idempotency_key`` returns the first refund. Raises
        ``UsageNotFound`` for an unknown id and ``InvalidUsage`` beyond what is left.
        """
        return refunds.refund(
            self.runtime(), usage_id, reason=reason, tokens=tokens, cost=cost, idempotency_key=idempotency_key
        )

    # -- plans and wallets ---------------------------------------------------------------

    def check_trials(self, *, now: dt.datetime | None = None) -> TrialNotices:
        """Send the trial notices that are due (``trial_ending``, ``trial_ended``), each once.

        ``flask ai-metering expire-reservations`` runs it; call it yourself to check more often.
        """
        return check_trials(self.runtime(), now=now)

    def subscribe(self, billable: t.Any, plan: Plan | str, **options: t.Any) -> Subscription:
        """Put ``billable`` on ``plan`` (a ``Plan`` or its slug); move it if already subscribed.

        Options: ``billing_mode`` ("plan" or "credits"), ``stripe_customer_id``,
        ``stripe_subscription_id`` (what webhooks match), ``started_at``, ``renews_at``,
        ``ends_at``, ``trial_ends_at``.
        """
        state = self._state()
        return subscribe(self.runtime(), state.db, self.resolve_billable(billable), plan, **options)

    def add_budget(
        self,
        billable: t.Any,
        *,
        user: t.Any = None,
        feature: str | None = None,
        model: str | None = None,
        period: str = "month",
        token_limit: int | None = None,
        cost_limit: Decimal | str | int | None = None,
        request_limit: int | None = None,
        mode: str = "hard",
        thresholds: t.Sequence[int] | None = None,
    ) -> Budget:
        """Limit the billable's calls further, inside its plan: all of them, or one user's, feature's or model's.

        A call is held on the plan and on every budget that matches it, all or none: a
        ``hard`` budget that cannot take the call refuses it (``AiLimitExceeded`` naming the
        budget, a 429); a ``soft`` one only counts and alerts. ``period`` is ``minute``,
        ``hour`` (UTC), ``day``, ``week``, ``month`` or ``year`` (calendar periods in
        ``AI_METERING_TIMEZONE``); ``request_limit`` counts calls, so a ``minute`` budget is an
        exact rate limit. ``thresholds`` replaces ``AI_METERING_ALERT_THRESHOLDS`` for it.
        A budget counts the calls made after it was added.

        :raises InvalidUsage: naming the field: no limit, a negative one, an unknown period or
            mode, or a feature the billable's plan forbids.
        """
        rt = self.runtime()
        budget_id = budgets.add_budget(
            rt.store,
            rt.settings,
            self.resolve_billable(billable),
            user_id=v.attribution_id(user, "user"),
            feature=v.feature(feature, strict=rt.settings.validate_features),
            model=v.name(model, "model"),
            period=period,
            token_limit=token_limit,
            cost_limit=cost_limit,
            request_limit=request_limit,
            mode=mode,
            thresholds=thresholds,
        )
        budget = self._budget(rt, budget_id)
        assert budget is not None
        return budget

    def remove_budget(self, budget: Budget | int) -> bool:
        """Retire a budget: calls stop holding on it at once. False if it was already removed.

        Its counters stay, so past periods can still be explained.
        """
        budget_id = budget if isinstance(budget, int) else budget.id
        return budgets.remove_budget(self.runtime().store, budget_id)

    def budgets(self, billable: t.Any = None) -> list[Budget]:
        """The live budgets of ``billable`` (of every billable with None), oldest first."""
        rt = self.runtime()
        key = None if billable is None else self.resolve_billable(billable)
        with rt.store.reading() as conn:
            rows = budgets.budgets_of(conn, key)
        return [attach(self._state().db, Budget, row) for row in rows]

    def _budget(self, rt: Runtime, budget_id: int) -> Budget | None:
        with rt.store.reading() as conn:
            row = conn.execute(sa.select(budgets.budgets).where(budgets.budgets.c.id == budget_id)).first()
        return None if row is None else attach(self._state().db, Budget, row)

    def subscription(self, billable: t.Any) -> Subscription | None:
        """The billable's subscription, if it has one: a fresh read, attached to ``db.session``."""
        return subscription_of(self.runtime(), self._state().db, self.resolve_billable(billable))

    def wallet(self, billable: t.Any) -> Wallet:
        """The billable's credit wallet (created empty on its first top-up)."""
        rt = self.runtime()
        return Wallet(
            rt.store,
            self.resolve_billable(billable),
            currency=rt.settings.currency,
            overdraft=rt.settings.credit_overdraft,
            sender=rt.app,
            max_meta_bytes=rt.settings.max_meta_bytes,
            low_threshold=rt.settings.credits_low_threshold,
        )

    def handle_stripe_webhook(self, payload: bytes, signature: str, **options: t.Any) -> t.Any:
        """Verify a Stripe webhook and apply it to the matching subscription; return the event.

        What the shipped ``POST <prefix>/stripe/webhook`` route calls; apps with their
        own route call it too. See :func:`flask_ai_metering.billing.webhooks.handle_stripe_webhook`.

        :raises stripe.SignatureVerificationError: the signature is wrong or too old (answer 400).
        :raises ValueError: the event is malformed (answer 400).
        """
        return handle_stripe_webhook(self, payload, signature, **options)

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

    def instrument(
        self,
        client: Client,
        *,
        feature: str | None = None,
        billable: t.Any = None,
        tenant: t.Any = None,
        max_cost: t.Any = None,
    ) -> Client:
        """Meter an OpenAI or Anthropic client's calls with no change at the call site; returns ``client``.

        ``max_cost`` caps each call's worst-case cost (as ``meter.call(max_cost=...)``).
        See :mod:`flask_ai_metering.metering.instrument` for what is metered and how.
        """
        return t.cast(
            Client, _instrument(self, client, feature=feature, billable=billable, tenant=tenant, max_cost=max_cost)
        )

    def uninstrument(self, client: Client) -> Client:
        """Undo :meth:`instrument`: the client's SDK methods are its own again; returns ``client``."""
        return t.cast(Client, _uninstrument(client))

    def scope(self, *, feature: str | None = None) -> FeatureScope:
        """``with meter.scope(feature="chat"):`` (or as a decorator): the feature of calls made inside."""
        return FeatureScope(feature)


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
