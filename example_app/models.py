"""The app's own tables: users with hashed passwords, and teams with members.

The team is the billable (its plan, quota and credits); the member is the user each
call is attributed to. Passwords go through werkzeug's ``generate_password_hash``
(scrypt) and are never stored or logged in clear.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets

import sqlalchemy as sa
from flask_login import UserMixin
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import relationship
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from .extensions import db


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Team(db.Model):  # type: ignore[name-defined,misc]
    """A team: billed as ``("Team", id)``; its ``id`` is a readable slug, also the join code."""

    __tablename__ = "example_teams"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(120))
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    members: Mapped[list[User]] = relationship(back_populates="team", order_by="User.id")

    @staticmethod
    def new_id(name: str) -> str:
        """A slug of the name plus a random suffix: ``acme-labs-3f9a``."""
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "team"
        return f"{slug}-{secrets.token_hex(2)}"


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "example_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    name: Mapped[str] = mapped_column(sa.String(120))
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    #: Site admins may open the metering dashboard; members may not.
    is_admin: Mapped[bool] = mapped_column(default=False)
    team_id: Mapped[str] = mapped_column(sa.ForeignKey(Team.id))
    team: Mapped[Team] = relationship(back_populates="members")
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)
