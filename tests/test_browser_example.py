"""The example app in headless Chromium (Debian's ``chromium``, Playwright, no browser download).

One visitor's story: they sign up, chat and watch the answer stream in, their usage
meter moves, they reach the Free limit and get the friendly page, upgrade and carry
on; then the admin opens the dashboard and finds that visitor's calls. Screenshots
land in ``docs/screenshots/example-*.png`` for the README.
"""

from __future__ import annotations

import threading
import typing as t
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from example_app import create_app
from example_app.model_server import LocalModelServer
from tests.test_browser import SHOTS
from tests.test_browser import Page
from tests.test_browser import browser  # noqa: F401  (the module-scoped Chromium fixture)

pytestmark = pytest.mark.browser

pytest.importorskip("openai")
pytest.importorskip("anthropic")

VISITOR = {"name": "Vera Visitor", "email": "vera@example.org", "password": "correct horse battery", "team": "Vera Lab"}


@pytest.fixture(scope="module")
def models() -> t.Iterator[LocalModelServer]:
    """The local model server; slow enough that an answer visibly streams in, word by word."""
    server = LocalModelServer(delay=0.04).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, models: LocalModelServer
) -> t.Iterator[str]:
    """The example app, seeded, on 127.0.0.1:<free port>, answered by the local model server."""
    path = tmp_path_factory.mktemp("browser-example") / "demo.sqlite"
    path.write_bytes(sqlite_template.read_bytes())
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
            "OPENAI_API_KEY": None,
            "ANTHROPIC_API_KEY": None,
            "EXAMPLE_MODEL_SERVER_URL": models.url,
            # Small enough to reach in a few answers.
            "EXAMPLE_FREE_TOKEN_LIMIT": 900,
        }
    )
    result = app.test_cli_runner().invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def send(page: t.Any, message: str) -> None:
    page.fill("#message", message)
    page.click("#send")


def meter_text(page: t.Any) -> str:
    return t.cast(str, page.locator("[data-ai-usage-meter]").inner_text()).strip()


def test_a_visitor_signs_up_chats_hits_the_limit_and_upgrades(
    browser: t.Any,  # noqa: F811
    server: str,
    models: LocalModelServer,
) -> None:
    visitor = Page(browser)
    p = visitor.page
    visitor.open(server + "/")
    p.click("text=Sign up >> nth=0")
    for field, value in VISITOR.items():
        p.fill(f"#{field}", value)
    p.click("button[type=submit]:has-text('Sign up')")
    p.wait_for_url("**/chat")
    team = p.locator(".msg.assistant strong").inner_text()
    assert team == "Vera Lab"
    before = meter_text(p)
    assert before.startswith("$0.00 of $1.00 used, resets in "), before

    # The answer streams in: seen part-way (still streaming), then whole.
    send(p, "What does the usage meter show?")
    p.wait_for_function(
        "(() => { const a = document.querySelector('[data-test=answer]');"
        " return a && a.classList.contains('streaming') && a.textContent.split(' ').length >= 3; })()"
    )
    partial = p.locator("[data-test=answer]").inner_text()
    p.wait_for_selector("[data-test=answer][data-done=true]")
    answer = p.locator("[data-test=answer]").inner_text()
    assert len(answer) > len(partial) and answer.startswith(partial.strip())
    assert "You asked: “What does the usage meter show?”." in answer

    # The usage meter moved.
    p.wait_for_function(f"document.querySelector('[data-ai-usage-meter]').innerText.trim() !== {before!r}")
    after = meter_text(p)
    assert after != before and float(p.locator("[data-ai-usage-meter] progress").get_attribute("value") or 0) > 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(SHOTS / "example-chat.png"))

    # Chat on until the Free plan is used up: a friendly page, not a JSON error. The streaming
    # was seen above; these answers need not take their time.
    models.delay = 0
    p.select_option("#model", "claude-haiku-4-5")
    answers = 1
    for i in range(12):
        send(p, f"Tell me more, part {i}")
        p.wait_for_function(
            "document.querySelector('[data-test=limit-page]')"
            " || [...document.querySelectorAll('[data-test=answer]')].at(-1).dataset.done === 'true'"
        )
        if p.locator("[data-test=limit-page]").count():
            break
        answers += 1
    limit = p.locator("[data-test=limit-page]")
    assert limit.is_visible()
    assert "reached your Free limit" in limit.inner_text()
    assert "It resets on" in p.locator("[data-test=resets]").inner_text()
    # The browser logs the 429 itself; nothing else may have failed.
    visitor.errors[:] = [e for e in visitor.errors if "429" not in e]
    p.screenshot(path=str(SHOTS / "example-limit.png"))

    # Upgrade, and carry on chatting.
    p.click("[data-test=upgrade]")
    p.wait_for_url("**/chat")
    assert "You're on the Pro plan now" in p.locator(".flash").inner_text()
    send(p, "Am I on Pro now?")
    p.wait_for_selector("[data-test=answer][data-done=true]")
    answers += 1
    assert "of $50.00 used" in meter_text(p)
    p.goto(server + "/team")
    code = p.locator("[data-test=team-code]").inner_text()
    assert visitor.errors == [] and visitor.external == []
    visitor.close()

    # The admin finds the visitor's calls in the dashboard.
    admin = Page(browser)
    a = admin.page
    admin.open(server + "/login")
    a.fill("#email", "admin@example.com")
    a.fill("#password", "admin-password")
    a.click("button[type=submit]")
    a.wait_for_url("**/chat")
    a.click("[data-test=dashboard-link]")
    a.wait_for_load_state("networkidle")
    assert "/ai-metering/" in a.url
    admin.open(f"{server}/ai-metering/usage?billable=Team:{code}")
    rows = a.locator("[data-test=ledger] tbody tr")
    assert rows.count() == answers
    models = set(a.locator("[data-test=ledger] tbody tr td:nth-child(6)").all_inner_texts())
    assert models == {"gpt-4o-mini", "claude-haiku-4-5"}
    a.screenshot(path=str(SHOTS / "example-dashboard.png"))
    assert admin.errors == [] and admin.external == []
    admin.close()


def test_a_member_is_not_let_into_the_dashboard(browser: t.Any, server: str) -> None:  # noqa: F811
    member = Page(browser)
    member.open(server + "/login")
    member.page.fill("#email", "member@example.com")
    member.page.fill("#password", "member-password")
    member.page.click("button[type=submit]")
    member.page.wait_for_url("**/chat")
    assert member.page.locator("[data-test=dashboard-link]").count() == 0
    assert member.open(server + "/ai-metering/").status == 403
    member.close()
