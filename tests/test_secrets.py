"""Secrets stay secret: reprs, error messages, the metadata sanitiser, and forget's SECRET_KEY."""

from __future__ import annotations

import traceback
import typing as t

import pytest
import sqlalchemy as sa

from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.errors import InvalidUsage
from flask_ai_metering.models import Usage
from flask_ai_metering.ops import privacy
from flask_ai_metering.ops.health import validate

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

API_KEY = "sk_live_SUPERSECRET_0123456789"
WEBHOOK_SECRET = "whsec_SUPERSECRET_0123456789"
TEAM = ("Team", "1")


def test_settings_and_runtime_reprs_hold_no_secret(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_STRIPE_API_KEY=API_KEY, AI_METERING_STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    with app.app_context():
        rt = meter.runtime()
        assert rt.settings.stripe_api_key == API_KEY  # still there to use
        for text in (repr(rt.settings), str(rt.settings), repr(rt), str(rt)):
            assert "SUPERSECRET" not in text
        try:
            meter.call(lambda: 1, billable=TEAM, provider="manual", usage={"input_tokens": 1}, meta={"a": object()})
        except InvalidUsage as exc:
            with_locals = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
        assert "InvalidUsage" in with_locals and "SUPERSECRET" not in with_locals


@pytest.mark.parametrize(
    "meta",
    [
        {"a": b"sk_live_in_bytes_value"},
        {"a": {"sk_live_as_a_set_member"}},
        {("sk_live_tuple_key",): 1},
        {"a": float("nan")},
    ],
    ids=["bytes", "set", "key", "nan"],
)
def test_errors_never_echo_metadata_values(make_app: AppFactory, meta: dict[t.Any, t.Any]) -> None:
    app, _, meter = make_app()
    with app.app_context():
        with pytest.raises(InvalidUsage) as raised:
            meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 1}, meta=meta)
    message = str(raised.value)
    assert message.startswith("meta") and "sk_live" not in message and "nan" not in message.lower()


SECRET_KEYS = [
    "secret_key",
    "stripe_secret_key",
    "aws_secret_access_key",
    "openai_key",
    "access_key",
    "api_keys",
    "apiKey",
    "x-api-key",
    "credentials",
    "passwd",
    "passwords",
    "bearer",
    "jwt",
    "refreshToken",
    "session_token",
    "Authorization",
]
PROMPT_KEYS = ["input", "output", "query", "chat_history", "messagesList", "user_prompt_text", "completions"]
KEPT_KEYS = ["ticket", "input_tokens", "query_id", "message_count", "session_id", "user_id", "model", "keyword"]


def stored_meta(make_app: AppFactory, meta: dict[str, t.Any], **config: t.Any) -> t.Any:
    app, _, meter = make_app(**config)
    with app.app_context():
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 1}, meta=meta)
        with meter.runtime().store.engine.connect() as conn:
            return conn.execute(sa.select(Usage.meta).order_by(Usage.id.desc()).limit(1)).scalar_one()


def test_the_sanitiser_matches_key_words_anywhere_in_the_name(make_app: AppFactory) -> None:
    meta: dict[str, t.Any] = {key: "x" for key in SECRET_KEYS + PROMPT_KEYS + KEPT_KEYS}
    meta["nested"] = {"openai_key": "x", "items": [{"chat_history": ["hi"], "ok": 1}]}
    stored = stored_meta(make_app, meta)
    assert sorted(stored) == sorted([*KEPT_KEYS, "nested"])
    assert stored["nested"] == {"items": [{"ok": 1}]}


def test_the_sanitiser_redacts_key_shaped_values(make_app: AppFactory) -> None:
    values = {
        "a": "sk-abc123def456ghi",
        "b": "sk_live_51HxYz0123456789",
        "c": "Bearer eyJabc.def.ghi-0123456789",
        "d": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
        "e": ["ok", "note: sk_test_0123456789abcdef"],
        "plain": "task-123",
    }
    stored = stored_meta(make_app, values)
    assert stored == {
        "a": "[redacted]",
        "b": "[redacted]",
        "c": "[redacted]",
        "d": "[redacted]",
        "e": ["ok", "[redacted]"],
        "plain": "task-123",
    }
    assert stored_meta(make_app, {"a": "sk-abc123def456ghi"}, AI_METERING_SANITIZE_METADATA=False) == {
        "a": "sk-abc123def456ghi"
    }


@pytest.mark.parametrize("key", [None, "", "dev", "changeme", "short"])
def test_forget_refuses_without_a_real_secret_key(make_app: AppFactory, key: str | None) -> None:
    app, _, meter = make_app(SECRET_KEY=key)
    with app.app_context():
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 1})
        with pytest.raises(ConfigurationError, match="SECRET_KEY"):
            privacy.forget(meter.runtime(), TEAM)
        assert privacy.forget(meter.runtime(), TEAM, dry_run=True)["usage rows"] == 1  # the preview works
        result = app.test_cli_runner().invoke(args=["ai-metering", "forget", "Team:1", "--yes"])
        assert result.exit_code == 2 and "SECRET_KEY" in result.stderr
        with meter.runtime().store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(Usage)).scalar_one() == 1
        assert any(line.startswith("config: SECRET_KEY is") for line in validate(app))


def test_validate_is_quiet_about_a_real_secret_key(make_app: AppFactory) -> None:
    app, _, _ = make_app(SECRET_KEY="a-long-random-secret-key-0123456789")
    with app.app_context():
        assert not [line for line in validate(app) if "SECRET_KEY" in line]
