"""The dashboard: access, filters, every page, CSV export, and ledger == rollups."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import typing as t
from decimal import Decimal

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from jinja2 import StrictUndefined

from flask_ai_metering import AiMetering
from flask_ai_metering.dashboard import pages
from flask_ai_metering.dashboard.export import safe_cell
from flask_ai_metering.dashboard.format import money
from flask_ai_metering.reporting import queries
from flask_ai_metering.reporting.filters import FilterError
from flask_ai_metering.reporting.filters import Filters
from flask_ai_metering.reporting.filters import parse_filters
from flask_ai_metering.reporting.rollups import aggregate
from tests.conftest import AppFactory
from tests.conftest import add_plan

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC)


def seed(meter: AiMetering, db: SQLAlchemy) -> None:
    """A small, varied ledger: three billables, two providers, a tenant, an unpriced model."""
    add_plan(db, slug="pro", token_limit=5000, cost_limit=Decimal("100"))
    # Close the app's session first: on MariaDB its REPEATABLE READ snapshot would hide the
    # subscription row that subscribe() then reads back through db.session (a core issue).
    db.session.remove()
    meter.subscribe(("Team", "1"), "pro")
    rows = []
    for i in range(24):
        rows.append(
            {
                "billable": ("Team", str(i % 3)),
                "tenant": ("Org", "acme") if i % 2 else None,
                "provider": "anthropic" if i % 4 == 0 else "openai",
                "model": "claude-sonnet-4-5" if i % 4 == 0 else "gpt-4o-mini",
                "feature": "chat" if i % 3 else "summary",
                "usage": {"input_tokens": 100 + i, "output_tokens": 50, "cached_input_tokens": 20},
                "occurred_at": NOW - dt.timedelta(days=i % 40, hours=i),
            }
        )
    rows.append(
        {"billable": ("Team", "1"), "provider": "openai", "model": "mystery-model", "usage": {"input_tokens": 10}}
    )
    rows.append(
        {
            "billable": ("Team", "2"),
            "provider": "openai",
            "model": '=HYPERLINK("x")',
            "feature": "chat",
            "usage": {"input_tokens": 1},
        }
    )
    meter.record_batch(rows)


@pytest.fixture
def dash(make_app: AppFactory) -> t.Iterator[tuple[Flask, AiMetering]]:
    app, db, meter = make_app(AI_METERING_VALIDATE_FEATURES=False)
    app.jinja_env.undefined = StrictUndefined
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        seed(meter, db)
        yield app, meter


def test_denied_without_an_authorizer(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    client = app.test_client()
    for path in (
        "/ai-metering/",
        "/ai-metering/usage",
        "/ai-metering/usage.csv",
        "/ai-metering/plans",
        "/ai-metering/billables/Team/1",
    ):
        assert client.get(path).status_code == 403


def test_authorizer_gets_the_flask_login_user(make_app: AppFactory) -> None:
    flask_login = pytest.importorskip("flask_login")
    app, _, meter = make_app(SECRET_KEY="x")
    manager = flask_login.LoginManager(app)
    manager.user_loader(lambda user_id: None)
    seen: list[t.Any] = []

    @meter.dashboard_authorizer
    def allow(user: t.Any) -> bool:
        seen.append(user)
        return bool(user.is_authenticated)

    assert app.test_client().get("/ai-metering/").status_code == 403
    assert seen and seen[0].is_anonymous


def test_every_page_renders(dash: tuple[Flask, AiMetering]) -> None:
    app, _ = dash
    client = app.test_client()
    for path in (
        "/ai-metering/",
        "/ai-metering/?group=provider",
        "/ai-metering/usage",
        "/ai-metering/plans",
        "/ai-metering/billables/Team/1",
        "/ai-metering/billables/Nobody/0",
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        assert b"cdn" not in response.data.lower()
    overview = client.get("/ai-metering/").get_data(as_text=True)
    assert 'data-test="unpriced"' in overview and "mystery-model" in overview
    assert re.search(r"/ai-metering/static/plotly-[\d.]+\.min\.js", overview)
    assert overview.count('type="application/json"') == 6  # cost, activity, tokens, error rate, latency, models
    plans = client.get("/ai-metering/plans").get_data(as_text=True)
    assert re.search(r'data-test="subscribers">1<', plans)


def test_pages_are_read_only(dash: tuple[Flask, AiMetering]) -> None:
    app, _ = dash
    assert app.test_client().post("/ai-metering/").status_code == 405


@pytest.mark.parametrize(
    "query",
    [
        "start=2026-13-01",
        "end=yesterday",
        "start=2026-02-01&end=2026-01-01",
        "billable=nocolon",
        "page=0",
        "page=x",
        "group=tenant",
        "model=" + "m" * 151,
        "start=2000-01-01&end=2026-01-01",
    ],
)
def test_bad_filters_are_400(dash: tuple[Flask, AiMetering], query: str) -> None:
    app, _ = dash
    for path in ("/ai-metering/", "/ai-metering/usage", "/ai-metering/usage.csv"):
        response = app.test_client().get(f"{path}?{query}")
        if query.startswith("group") and path != "/ai-metering/":
            continue
        assert response.status_code == 400, (path, query)


def test_filters_narrow_the_explorer_and_stay_in_links(dash: tuple[Flask, AiMetering]) -> None:
    app, _ = dash
    client = app.test_client()
    everything = client.get("/ai-metering/usage").get_data(as_text=True)
    narrowed = client.get("/ai-metering/usage?provider=anthropic&tenant=acme").get_data(as_text=True)
    assert everything.count("<tr>") > narrowed.count("<tr>") > 1
    assert "gpt-4o-mini" not in narrowed.split("<tbody>")[1]
    assert "provider=anthropic" in narrowed and "tenant=acme" in narrowed


def test_pagination(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        meter.record_batch(
            [
                {
                    "billable": ("Team", "1"),
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "usage": {"input_tokens": i + 1},
                }
                for i in range(60)
            ]
        )
    client = app.test_client()
    first = client.get("/ai-metering/usage").get_data(as_text=True)
    assert 'rel="next"' in first and "of 60" in first
    second = client.get("/ai-metering/usage?page=2").get_data(as_text=True)
    assert 'rel="next"' not in second and "Rows 51–60" in second


def test_csv_exports_exactly_the_filtered_rows_safely(dash: tuple[Flask, AiMetering]) -> None:
    app, _ = dash
    client = app.test_client()
    response = client.get("/ai-metering/usage.csv?billable=Team:2&feature=chat")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert rows and all(r["billable_id"] == "2" and r["feature"] == "chat" for r in rows)
    page = client.get("/ai-metering/usage?billable=Team:2&feature=chat").get_data(as_text=True)
    assert f"of {len(rows)}" in page
    assert any(r["model"] == '\'=HYPERLINK("x")' for r in rows)
    assert safe_cell("-1+2") == "'-1+2" and safe_cell(-3) == -3 and safe_cell("@SUM") == "'@SUM"


#: Filters that send each aggregate to a different rollup table (see ``queries.rollup_for``).
VARIANTS: list[dict[str, str]] = [
    {},  # totals table for the charts, per-billable totals for the ranking
    {"provider": "openai", "tenant": "acme"},  # the ranking from the detailed rollup
    {"billable": "Team:2"},  # everything from the detailed rollup
]


def figures(meter: AiMetering, query: dict[str, str]) -> list[t.Any]:
    """Every aggregate the overview, the explorer and a billable's page show for ``query``."""
    rt = meter.runtime()
    f = parse_filters({"start": (NOW - dt.timedelta(days=35)).date().isoformat(), **query}, "Europe/Berlin")
    data = pages.overview(rt, f)
    current = data.current
    mine = pages.billable_page(rt, ("Team", "1"), f).summary
    return [
        (current.totals, data.previous.totals, current.by_day, current.by_provider, current.by_model),
        (current.by_feature, current.by_day_group, current.unpriced, current.unpriced_pairs),
        [(e["billable"], e["totals"]) for e in data.top],
        (mine.totals, mine.by_day, mine.by_model),
    ]


def sources(meter: AiMetering, query: dict[str, str], *, by_billable: bool) -> list[str]:
    f = parse_filters({"start": (NOW - dt.timedelta(days=35)).date().isoformat(), **query}, "Europe/Berlin")
    with meter.runtime().store.engine.connect() as conn:
        found = queries.sources(conn, f, use_rollups=True, by_billable=by_billable)
    return [str(source.name) for source, _ in found]


def test_rollups_give_the_same_numbers_as_the_ledger(make_app: AppFactory, backend: str) -> None:
    ledger_app, db, meter = make_app(AI_METERING_VALIDATE_FEATURES=False, AI_METERING_TIMEZONE="Europe/Berlin")
    rollup_app, _, rollup_meter = make_app(
        AI_METERING_VALIDATE_FEATURES=False, AI_METERING_AGGREGATION_TABLES=True, AI_METERING_TIMEZONE="Europe/Berlin"
    )
    with ledger_app.app_context():
        seed(meter, db)
    with rollup_app.app_context():
        assert aggregate(rollup_meter.runtime()) > 0
        # Each variant reads the table it should: the smallest that can answer.
        assert sources(rollup_meter, {}, by_billable=False) == ["ai_metering_usage_daily_totals"]
        assert sources(rollup_meter, {}, by_billable=True) == ["ai_metering_usage_daily_billables"]
        assert sources(rollup_meter, VARIANTS[1], by_billable=True) == ["ai_metering_usage_daily"]
        assert sources(rollup_meter, VARIANTS[2], by_billable=False) == ["ai_metering_usage_daily"]

    def compare() -> None:
        for query in VARIANTS:
            with ledger_app.app_context():
                expected = figures(meter, query)
            with rollup_app.app_context():
                assert figures(rollup_meter, query) == expected, query
            assert expected[0][0].calls > 0

    compare()
    with ledger_app.app_context():
        assert figures(meter, {})[0][0].calls == 26
        # Written after the last aggregate run, today and on a back-filled day: read from the ledger.
        meter.record_batch(
            [
                {"billable": ("Team", "2"), "provider": "openai", "model": "gpt-4o", "usage": {"input_tokens": 9}},
                {
                    "billable": ("Team", "7"),
                    "tenant": ("Org", "acme"),
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "usage": {"input_tokens": 10**6},
                    "occurred_at": NOW - dt.timedelta(days=12),
                },
            ]
        )
    with rollup_app.app_context():
        assert sources(rollup_meter, {}, by_billable=True) == ["ai_metering_usage_daily_billables", "ai_metering_usage"]
    compare()
    with ledger_app.app_context():
        assert figures(meter, {})[2][0][0] == ("Team", "7")  # the back-filled whale tops the ranking


def test_filters_parse_and_round_trip() -> None:
    f = parse_filters({"start": "2026-01-01", "end": "2026-01-31", "billable": "Team:42", "page": "3"}, "UTC")
    assert f.days == 31 and f.billable == ("Team", "42") and f.previous().end == dt.date(2025, 12, 31)
    assert f.query(page=None) == {"start": "2026-01-01", "end": "2026-01-31", "billable": "Team:42"}
    assert f.since == dt.datetime(2026, 1, 1, tzinfo=UTC) and f.until == dt.datetime(2026, 2, 1, tzinfo=UTC)
    default = parse_filters({}, "UTC", today=dt.date(2026, 3, 30))
    assert (default.start, default.end, default.query()) == (dt.date(2026, 3, 1), dt.date(2026, 3, 30), {})
    with pytest.raises(FilterError):
        parse_filters({"start": "2026-1-1"}, "UTC")


def test_money_filter() -> None:
    assert money(Decimal("1234.5")) == "$1,234.50"
    assert money(Decimal("0.0123")) == "$0.0123"
    assert money(Decimal("0.000001234")) == "$0.000001"
    assert money(Decimal("-2"), "eur") == "-€2.00"
    assert money(None) == "—"


def test_plotly_is_served_locally_and_cached(dash: tuple[Flask, AiMetering]) -> None:
    from plotly.offline import get_plotlyjs_version

    app, _ = dash
    client = app.test_client()
    response = client.get(f"/ai-metering/static/plotly-{get_plotlyjs_version()}.min.js")
    assert response.status_code == 200 and response.mimetype == "text/javascript"
    assert "max-age=31536000" in response.headers["Cache-Control"]
    response.close()
    assert client.get("/ai-metering/static/plotly-0.0.1.min.js").status_code == 404


def test_base_template_is_configurable(make_app: AppFactory, tmp_path: t.Any) -> None:
    (tmp_path / "host.html").write_text(
        "<html><body><p>HOST CHROME</p>{% block content %}{% endblock %}{% block scripts %}{% endblock %}</body></html>"
    )
    app, _, meter = make_app(AI_METERING_BASE_TEMPLATE="host.html")
    app.template_folder = str(tmp_path)
    meter.dashboard_authorizer(lambda user: True)
    assert "HOST CHROME" in app.test_client().get("/ai-metering/plans").get_data(as_text=True)


@pytest.mark.parametrize(
    ("query", "by_billable", "expected"),
    [
        ({}, False, "ai_metering_usage_daily_totals"),
        ({"tenant": "acme", "model": "m"}, False, "ai_metering_usage_daily_totals"),
        ({}, True, "ai_metering_usage_daily_billables"),
        ({"tenant": "acme"}, True, "ai_metering_usage_daily_billables"),
        ({"feature": "chat"}, True, "ai_metering_usage_daily"),
        ({"billable": "Team:1"}, False, "ai_metering_usage_daily"),
        ({"billable": "Team:1"}, True, "ai_metering_usage_daily"),
    ],
)
def test_the_smallest_rollup_that_can_answer_is_chosen(query: dict[str, str], by_billable: bool, expected: str) -> None:
    f: Filters = parse_filters(query, "UTC")
    assert queries.rollup_for(f, by_billable=by_billable).name == expected


# -- issue 11 item 10: memory bounded by what a page shows, not by the ledger's cardinality --

#: Distinct model names in the wide ledger: more than any page may read rows for.
WIDE_MODELS = 200


@pytest.fixture
def wide(make_app: AppFactory, backend: str) -> t.Iterator[tuple[Flask, AiMetering]]:
    """``WIDE_MODELS`` model names (every third unpriced) over three days, a few calls each.

    On every backend: PostgreSQL reads the overview in one grouped pass, the others per figure.
    """
    prices = {
        provider: {
            "models": {
                f"priced-{m:03d}": {"input_price_per_1k": f"0.00{m % 7 + 1}", "output_price_per_1k": "0.002"}
                for m in range(WIDE_MODELS)
                if m % 3 == rest
            }
        }
        for provider, rest in (("anthropic", 0), ("openai", 1))
    }
    app, db, meter = make_app(AI_METERING_VALIDATE_FEATURES=False, AI_METERING_PROVIDERS=prices)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        meter.record_batch(
            [
                {
                    "billable": ("Team", str(i % 4)),
                    "provider": "anthropic" if m % 3 == 0 else "openai",
                    "model": f"mystery-{m:03d}" if m % 3 == 2 else f"priced-{m:03d}",
                    "feature": ("chat", "summary", "search")[i % 3],
                    "usage": {"input_tokens": 100 + 7 * m + i, "output_tokens": 10 + m},
                    "occurred_at": NOW - dt.timedelta(days=i % 3, minutes=m),
                }
                for m in range(WIDE_MODELS)
                for i in range(1 + m % 3)
            ]
        )
        yield app, meter


class RowCounter:
    """Counts the rows every ``Connection.execute`` returns (frozen, then replayed to the caller)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sqlalchemy as sa

        self.rows = 0
        original = sa.Connection.execute

        def execute(conn: t.Any, statement: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
            result = original(conn, statement, *args, **kwargs)
            if not result.returns_rows:
                return result
            frozen = result.freeze()
            self.rows += len(frozen.data)
            return frozen()

        monkeypatch.setattr(sa.Connection, "execute", execute)


def test_pages_read_a_bounded_number_of_rows(wide: tuple[Flask, AiMetering], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every page aggregates in SQL: the rows it reads do not grow with the number of models."""
    app, _ = wide
    client = app.test_client()
    counter = RowCounter(monkeypatch)
    for path, most in (
        ("/ai-metering/", 150),
        ("/ai-metering/?group=provider", 150),
        ("/ai-metering/usage", 60),  # 51 ledger rows, one row of totals
        ("/ai-metering/billables/Team/1", 100),
    ):
        counter.rows = 0
        response = client.get(path)
        assert response.status_code == 200, path
        assert counter.rows <= most, (path, counter.rows)
    usage_page = client.get("/ai-metering/usage").get_data(as_text=True)
    calls = sum(1 + m % 3 for m in range(WIDE_MODELS))
    assert f"of {calls:,}" in usage_page


def test_unpriced_banner_is_capped(wide: tuple[Flask, AiMetering]) -> None:
    app, _ = wide
    page = app.test_client().get("/ai-metering/").get_data(as_text=True)
    banner = page[page.index('data-test="unpriced"') :]
    banner = banner[: banner.index("</div>")]
    unpriced = [m for m in range(WIDE_MODELS) if m % 3 == 2]
    shown = 20  # the cap the issue asks for
    assert banner.count("mystery-") == shown
    # The most-called first (every unpriced model here has 3 calls, then by name).
    assert "openai/mystery-002" in banner
    assert f"and {len(unpriced) - shown:,} more unpriced models" in banner


def test_breakdowns_and_other_match_the_ledger(wide: tuple[Flask, AiMetering]) -> None:
    """Top N plus "Other" in SQL gives what folding every row in Python gave."""
    from flask_ai_metering.models import Usage

    app, meter = wide
    db = app.extensions["sqlalchemy"]
    f = parse_filters({}, "UTC")
    data = pages.overview(meter.runtime(), f)
    ledger = db.session.execute(db.select(Usage)).scalars().all()
    for key, ranking in (
        ("model", data.current.by_model),
        ("provider", data.current.by_provider),
        ("feature", data.current.by_feature),
    ):
        expected: dict[str, list[int]] = {}
        for row in ledger:
            cell = expected.setdefault(getattr(row, key) or "", [0, 0, 0])
            cell[0] += int(row.total_cost * 10**12)  # pico-units, exact from a Decimal
            cell[1] += 1
            cell[2] += row.total_tokens
        order = sorted(expected.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        shown = pages.ranked(ranking)
        if len(order) <= pages.TOP_N:
            assert [(n, tot.cost_units, tot.calls, tot.total_tokens) for n, tot in shown] == [(n, *v) for n, v in order]
            continue
        head = order[: pages.TOP_N - 1]
        assert [(n, tot.cost_units, tot.calls, tot.total_tokens) for n, tot in shown[:-1]] == [(n, *v) for n, v in head]
        rest = [v for _, v in order[pages.TOP_N - 1 :]]
        other = shown[-1]
        assert other[0] == "Other"
        assert (other[1].cost_units, other[1].calls, other[1].total_tokens) == tuple(map(sum, zip(*rest, strict=True)))


# -- issue 11 item 8: names reach Plotly as text, never as Plotly's pseudo-HTML --------------

HOSTILE = (
    '<a href="https://evil.example/">click</a>',
    '<span style="font-size:60px;color:red">PAY NOW</span>',
    "<b>bold</b> & <br>",
)


def test_names_are_escaped_for_plotly_in_every_figure(make_app: AppFactory) -> None:
    """Trace names and tick labels hold ``&lt;``/``&gt;``/``&amp;``: Plotly shows them as text."""
    import json

    from flask_ai_metering.dashboard import charts

    app, _, meter = make_app(AI_METERING_VALIDATE_FEATURES=False)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        meter.record_batch(
            [
                {
                    "billable": ("Team", "1"),
                    "provider": "openai",
                    "model": name,
                    "feature": name,
                    "usage": {"input_tokens": 10},
                }
                for name in HOSTILE
            ]
        )
        client = app.test_client()
        seen: set[str] = set()
        for path in ("/ai-metering/", "/ai-metering/?group=provider", "/ai-metering/billables/Team/1"):
            body = client.get(path).get_data(as_text=True)
            scripts = re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', body, re.S)
            assert scripts, path
            for script in scripts:
                for trace in json.loads(script)["data"]:
                    texts = [trace.get("name") or ""] + [v for v in (trace.get("y") or []) if isinstance(v, str)]
                    for text in texts:
                        assert "<" not in text and ">" not in text, (path, text)
                    seen.update(texts)
    assert {charts.plotly_text(name) for name in HOSTILE} <= seen
    assert charts.plotly_text(HOSTILE[2]) == "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;br&gt;"
    assert charts.plotly_text("") == "(none)"
