"""What a metered call needs, captured from the app when it starts.

A stream that finishes in another thread, or outside the app context that
started it, commits with the same engine, settings and prices it began with.
"""

from __future__ import annotations

import dataclasses
import typing as t

from .errors import InvalidUsage

if t.TYPE_CHECKING:
    from flask import Flask

    from .billing import BillingDriver
    from .config import Settings
    from .metering.fast_path import FastPath
    from .observability import Observer
    from .pricing import PriceBook
    from .providers import Provider
    from .transactions import Transactions


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The app's objects a metered call uses, from reserve to commit."""

    app: Flask
    settings: Settings
    store: Transactions
    prices: PriceBook
    providers: t.Mapping[str, Provider]
    billing: BillingDriver
    #: The dialect's one-statement path (PostgreSQL), or the no-op path elsewhere:
    #: chosen once per app, so the portable code never asks which database it is on.
    fast: FastPath
    #: OpenTelemetry and Prometheus observers of finished calls (empty: none configured).
    observers: tuple[Observer, ...] = ()

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(sorted(self.providers))
            raise InvalidUsage(
                f"provider {name!r} is not registered (known: {known}); add it to AI_METERING_PROVIDERS"
            ) from None
