"""Spent usage the database could not take is kept, never lost, and committed later.

Once the provider has answered, its usage is owed. When the commit still fails
after its retries (the database gone, the disk full), :func:`keep` stores the
ledger row in the reservation's ``payload`` (the reservation stays ``pending``);
when even that write fails, it appends the row to a local append-only journal
(``AI_METERING_JOURNAL_PATH``). ``expire-reservations`` then commits what was
kept instead of releasing the hold: :func:`replay_journal` first, then every
expired reservation that carries a payload.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import typing as t

import sqlalchemy as sa

from .ledger import reservations
from .ledger import to_payload

if t.TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("flask_ai_metering")

#: The journal's file name in the app's instance folder, when no path is configured.
JOURNAL_NAME = "ai_metering_journal.jsonl"


def journal_path(rt: Runtime) -> str:
    """Where this app keeps usage its database could not take."""
    return rt.settings.journal_path or os.path.join(rt.app.instance_path, JOURNAL_NAME)


def keep(rt: Runtime, reservation_id: int, values: dict[str, t.Any]) -> str:
    """Keep a committed call's ledger row durably; return where (``"payload"`` or the journal's path)."""
    payload = to_payload(values)
    try:
        work = sa.update(reservations).where(reservations.c.id == reservation_id, reservations.c.status == "pending")
        rt.store.run(lambda conn: conn.execute(work.values(payload=payload)))
        return "payload"
    except Exception:
        log.warning("could not keep reservation %s's usage in the database; journaling it", reservation_id)
    path = journal_path(rt)
    line = json.dumps({"reservation_id": reservation_id, "values": payload}, separators=(",", ":")) + "\n"
    with _locked(path, "a") as journal:
        journal.write(line)
        journal.flush()
        os.fsync(journal.fileno())
    return path


def journal_lines(rt: Runtime) -> int:
    """How many rows the journal keeps."""
    path = journal_path(rt)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as journal:
        return sum(1 for line in journal if line.strip())


def replay_journal(rt: Runtime, commit_one: t.Callable[[int, dict[str, t.Any]], None]) -> int:
    """Commit every journaled row through ``commit_one``; keep the lines that still fail.

    Returns how many rows were committed. Safe to run from several processes: the
    journal is locked while it is read and rewritten.
    """
    path = journal_path(rt)
    if not os.path.exists(path):
        return 0
    done = 0
    with _locked(path, "r+") as journal:
        left = []
        for line in journal.read().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                commit_one(int(entry["reservation_id"]), entry["values"])
                done += 1
            except Exception:
                log.exception("a journaled usage row could not be committed yet; it stays in %s", path)
                left.append(line)
        journal.seek(0)
        journal.truncate()
        journal.write("".join(f"{line}\n" for line in left))
        journal.flush()
        os.fsync(journal.fileno())
    return done


@contextlib.contextmanager
def _locked(path: str, mode: str) -> t.Iterator[t.IO[str]]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, mode, encoding="utf-8") as journal:
        fcntl.flock(journal.fileno(), fcntl.LOCK_EX)
        try:
            yield journal
        finally:
            fcntl.flock(journal.fileno(), fcntl.LOCK_UN)
