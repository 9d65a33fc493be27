"""The dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright, no browser download).

Each page loads with no console error and no request leaving 127.0.0.1, every
chart is drawn with data, a filter changes the table, and the pages answer 403
without access. Screenshots land in ``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import os
import shutil
import threading
import typing as t
from pathlib import Path
from urllib.parse import urlparse

import pytest
from werkzeug.serving import make_server

from example_app import create_app
from example_app.seed import ensure_users

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
REQUIRE = os.environ.get("AI_METERING_REQUIRE_SERVICES") == "1"


def _chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    message = "Debian's chromium is not installed (apt-get install chromium)"
    if REQUIRE:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> t.Iterator[t.Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRE:
            pytest.fail("playwright is not installed (pip install playwright; never `playwright install`)")
        pytest.skip("playwright is not installed")
    executable = _chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> t.Iterator[str]:
    """The example app, seeded, served by werkzeug on 127.0.0.1:<free port>."""
    path = tmp_path_factory.mktemp("browser") / "demo.sqlite"
    path.write_bytes(sqlite_template.read_bytes())
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"})
    result = app.test_cli_runner().invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        meter = app.extensions["ai_metering"]
        meter.record(
            billable=("Team", "acme"),
            provider="openai",
            model="gpt-next-preview",
            feature="chat",
            usage={"input_tokens": 500, "output_tokens": 100},
        )
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


class Page:
    """A browser page that records console errors and aborts every request off 127.0.0.1."""

    def __init__(self, browser: t.Any, width: int = 1360, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.route("**/*", self._guard)

    def _guard(self, route: t.Any) -> None:
        if urlparse(route.request.url).hostname != "127.0.0.1":
            self.external.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def login(self, server: str, email: str = "admin@example.com", password: str = "admin-password") -> None:
        """Log in through the example app's form (the seeded admin by default)."""
        self.open(f"{server}/login")
        self.page.fill("#email", email)
        self.page.fill("#password", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/chat")

    def open(self, url: str) -> t.Any:
        response = self.page.goto(url, wait_until="networkidle")
        return response

    def charts_drawn(self) -> list[int]:
        """Trace counts with data of each chart on the page (after Plotly drew them)."""
        self.page.wait_for_function(
            "[...document.querySelectorAll('[data-chart]')].every(n => n.dataset.rendered === 'true')", timeout=15000
        )
        return t.cast(
            list[int],
            self.page.evaluate(
                """[...document.querySelectorAll('[data-chart]')].map(
                     n => n.data.filter(tr => (tr.y || []).length || (tr.x || []).length).length)"""
            ),
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: t.Any, server: str) -> t.Iterator[Page]:
    p = Page(browser)
    p.login(server)
    yield p
    assert p.errors == [], p.errors
    assert p.external == [], p.external
    p.close()


def test_overview(page: Page, server: str) -> None:
    response = page.open(f"{server}/ai-metering/")
    assert response.status == 200
    drawn = page.charts_drawn()
    assert len(drawn) == 6 and all(drawn), drawn  # cost, activity, tokens, failures, latency per day, cost by model
    assert page.page.locator("[data-test=unpriced]").is_visible()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)
    # Issue 16's panels: the outlook KPIs (forecast, cache savings, error rate), errors by model,
    # tenants and users.
    for test in ("forecast", "savings", "error-rate", "health", "by-tenant"):
        assert page.page.locator(f"[data-test={test}]").is_visible(), test
    page.page.locator("section[aria-label=Outlook]").screenshot(path=str(SHOTS / "outlook.png"))
    page.page.locator("[data-test=health]").screenshot(path=str(SHOTS / "errors-by-model.png"))
    page.page.locator("[data-test=by-tenant]").screenshot(path=str(SHOTS / "by-tenant.png"))
    page.page.click("text=by provider")
    page.page.wait_for_load_state("networkidle")
    assert "group=provider" in page.page.url and all(page.charts_drawn())


def test_usage_explorer_filter_changes_the_table(page: Page, server: str) -> None:
    page.open(f"{server}/ai-metering/usage")
    cells = page.page.locator("[data-test=ledger] tbody tr td:nth-child(5)")
    assert {"openai", "anthropic"} <= set(cells.all_inner_texts())
    page.page.screenshot(path=str(SHOTS / "usage.png"), full_page=False)
    page.page.fill("input[name=provider]", "anthropic")
    page.page.click("button[type=submit]")
    page.page.wait_for_load_state("networkidle")
    assert "provider=anthropic" in page.page.url
    assert set(page.page.locator("[data-test=ledger] tbody tr td:nth-child(5)").all_inner_texts()) == {"anthropic"}


def test_billable_page(page: Page, server: str) -> None:
    page.open(f"{server}/ai-metering/billables/Team/acme")
    drawn = page.charts_drawn()
    assert drawn == [drawn[0]] and drawn[0] > 0
    assert "$" in page.page.locator("[data-test=limits]").inner_text()
    assert "Projected" in page.page.locator("[data-test=forecast]").inner_text()
    page.page.screenshot(path=str(SHOTS / "billable.png"), full_page=True)
    page.page.locator("[data-test=limits]").screenshot(path=str(SHOTS / "billable-forecast.png"))
    page.page.locator("[data-test=by-user]").screenshot(path=str(SHOTS / "by-user.png"))
    # Issue 15: each member's daily budget as burn-down bars, with its reset.
    budgets = page.page.locator("[data-test=budgets]")
    assert budgets.locator("[data-test=budget]").count() == 2  # the demo's two Acme members
    assert budgets.locator("[role=meter]").count() == 6  # tokens, cost and requests of each
    assert budgets.inner_text().count("resets at") == 2
    budgets.screenshot(path=str(SHOTS / "billable-budgets.png"))


def test_plans_page(page: Page, server: str) -> None:
    page.open(f"{server}/ai-metering/plans")
    assert page.page.locator("[data-test=subscribers]").all_inner_texts() == ["2", "3"]  # Free, Pro
    page.page.screenshot(path=str(SHOTS / "plans.png"))


def test_phone_layout(browser: t.Any, server: str) -> None:
    phone = Page(browser, width=390, height=844)
    phone.login(server)
    phone.open(f"{server}/ai-metering/")
    assert all(phone.charts_drawn())
    overflow = phone.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, overflow
    phone.page.screenshot(path=str(SHOTS / "overview-phone.png"), full_page=False)
    assert phone.errors == [] and phone.external == []
    phone.close()


def test_forbidden_without_access(page: Page, server: str) -> None:
    page.context.clear_cookies()
    page.login(server, "member@example.com", "member-password")  # not an admin
    response = page.open(f"{server}/ai-metering/")
    assert response.status == 403
    page.errors.clear()  # the browser logs the 403 itself


#: Model names that Plotly would otherwise draw as a link and as restyled text (issue 11, item 8).
HOSTILE = (
    '<a href="https://evil.example/">click</a>',
    '<span style="font-size:60px;color:red">PAY NOW</span>',
)


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> t.Iterator[str]:
    """The example app (no demo data) with usage of models named like HTML."""
    path = tmp_path_factory.mktemp("hostile") / "hostile.sqlite"
    path.write_bytes(sqlite_template.read_bytes())
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"})
    with app.app_context():
        ensure_users(app.extensions["sqlalchemy"])  # the demo admin logs in; no usage is seeded
        meter = app.extensions["ai_metering"]
        meter.record_batch(
            [
                {"billable": ("Team", "acme"), "provider": "openai", "model": name, "usage": {"input_tokens": 10}}
                for name in HOSTILE
            ]
        )
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


@pytest.mark.parametrize("path", ["/ai-metering/", "/ai-metering/?group=provider", "/ai-metering/billables/Team/acme"])
def test_names_in_charts_are_text(browser: t.Any, hostile_server: str, path: str) -> None:
    """No link and no styled span is created inside a chart; the name is shown literally."""
    page = Page(browser)
    page.login(hostile_server)
    try:
        _assert_names_are_text(page, hostile_server, path)
    finally:
        page.close()


def _assert_names_are_text(page: Page, hostile_server: str, path: str) -> None:
    assert page.open(f"{hostile_server}{path}").status == 200
    assert all(page.charts_drawn())
    links = page.page.eval_on_selector_all("[data-chart] a", "els => els.map(e => e.outerHTML)")
    assert links == []
    styled = page.page.eval_on_selector_all(
        "[data-chart] svg [style*='60px'], [data-chart] svg [style*='red']", "els => els.map(e => e.outerHTML)"
    )
    assert styled == []
    shown = page.page.evaluate(
        "[...document.querySelectorAll('[data-chart] svg text')].map(e => e.textContent).join('\\n')"
    )
    if path.endswith("group=provider"):
        assert HOSTILE[0] in shown  # the "Cost by model" chart is on this page too
    else:
        assert HOSTILE[0] in shown and HOSTILE[1] in shown, shown
