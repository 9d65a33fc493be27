"""One billable per customer: every form the app passes maps to the same ``(type, id)``.

* A model instance (Flask-Login's ``current_user`` proxy included) is its class name
  and primary key: ``("Team", "42")``.
* A tuple whose type names a model of the app's Flask-SQLAlchemy registry exactly is
  kept; one that matches a model's name case-insensitively (``("team", 42)``) is
  canonicalised to it; an alias (``meter.billable_alias("org", "Team")`` or
  ``AI_METERING_BILLABLE_ALIASES``) maps to its target, case-insensitively too.
* Forms that could name two customers are refused with ``InvalidUsage``: a tuple
  type matching several model names that differ only in case, or an instance of a
  class whose name two mapped classes share.
* Any other tuple type is stored as given.

The mapping depends only on the app's models and configuration, never on what a
process happened to see, so every process maps a form the same way.
"""

from __future__ import annotations

import threading
import typing as t

from . import validation as v
from .errors import ConfigurationError
from .errors import InvalidUsage

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy


class BillableTypes:
    """The canonical billable types of one app: its models' class names and its aliases."""

    def __init__(self, db: SQLAlchemy | None, aliases: t.Mapping[str, str] | None = None) -> None:
        self._db = db
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()
        #: ``(number of mappers seen, {lower-cased name: names}, {names of several classes})``.
        self._models: tuple[int, dict[str, set[str]], set[str]] = (-1, {}, set())
        for alias, target in (aliases or {}).items():
            self.add_alias(alias, target, error=ConfigurationError)

    def add_alias(self, alias: t.Any, target: t.Any, *, error: type[Exception] = InvalidUsage) -> None:
        """Map the tuple type ``alias`` (any case) to the billable type ``target``."""
        for name, value in (("alias", alias), ("target", target)):
            if not isinstance(value, str) or not value.strip() or len(value) > 100 or "\x00" in value:
                raise error(f"billable {name} must be a non-empty str of at most 100 characters, got {value!r}")
        key = alias.lower()
        with self._lock:
            known = self._aliases.get(key)
            if known is not None and known != target:
                raise error(f"billable alias {alias!r} already maps to {known!r}, not {target!r}")
            models = self._model_names().get(key, set())
            if models and target not in models:
                raise error(
                    f"billable alias {alias!r} is the name of model {sorted(models)[0]!r}; it cannot map elsewhere"
                )
            self._aliases[key] = target

    def _model_names(self) -> dict[str, set[str]]:
        return self._refresh()[1]

    def _refresh(self) -> tuple[int, dict[str, set[str]], set[str]]:
        """The app's mapped classes by lower-cased name, rebuilt when models were added since."""
        registry = getattr(getattr(self._db, "Model", None), "registry", None)
        if registry is None:
            return self._models
        mappers = registry.mappers
        if len(mappers) == self._models[0]:
            return self._models
        by_lower: dict[str, set[str]] = {}
        seen: dict[str, int] = {}
        for mapper in mappers:
            name = mapper.class_.__name__
            by_lower.setdefault(name.lower(), set()).add(name)
            seen[name] = seen.get(name, 0) + 1
        self._models = (len(mappers), by_lower, {n for n, count in seen.items() if count > 1})
        return self._models

    def canonical_type(self, kind: str, field: str = "billable") -> str:
        """The canonical spelling of a tuple's billable type; see the module doc."""
        _, by_lower, shared = self._refresh()
        key = kind.lower()
        names = by_lower.get(key, set())
        if kind in names:
            if kind in shared:
                raise InvalidUsage(f"{field} type {kind!r} is the name of several mapped classes: it is ambiguous")
            return kind
        if len(names) > 1:
            raise InvalidUsage(
                f"{field} type {kind!r} matches the models {', '.join(sorted(names))}: it is ambiguous;"
                " pass the exact class name or a model instance"
            )
        if names:
            (name,) = names
            if name in shared:
                raise InvalidUsage(f"{field} type {kind!r} is the name of several mapped classes: it is ambiguous")
            return name
        return self._aliases.get(key, kind)

    def key(self, billable: t.Any, field: str = "billable") -> tuple[str, str]:
        """``(type, id)`` of a model instance, a proxy of one, or a ``(type, id)`` tuple, canonicalised."""
        target = billable
        unwrap = getattr(billable, "_get_current_object", None)
        if callable(unwrap):  # werkzeug's LocalProxy (Flask-Login's current_user): the object behind it
            target = unwrap()
        if isinstance(target, tuple):
            kind, ident = v.billable_key(target, field)
            return self.canonical_type(kind, field), ident
        kind, ident = v.billable_key(target, field)
        if kind in self._refresh()[2]:
            raise InvalidUsage(
                f"{field} is a {kind}, a class name several mapped classes share: it is ambiguous;"
                " rename one, or pass a (type, id) tuple"
            )
        return kind, ident
