"""Alerts for people and systems outside the app: the webhook outbox and its delivery."""
