"""Requests per second of Flask routes under gunicorn, driven by wrk, beside Flask-Limiter.

What a user measures: a route under a real WSGI server. gunicorn runs with 2
sync workers and ``--preload``, then with ``--threads 8`` (gthread), each time
driven by wrk (2 threads, 16 connections) on this machine's loopback. In the
same run, each of these is served by its own gunicorn (``bench/http_app.py``):

- a plain JSON route (the ceiling),
- Flask-Limiter with memory storage and with Redis storage (the baseline: the
  ratios are against Flask-Limiter on Redis, measured in the same run),
- a bare ``@quota_required`` route, then ``@quota_required`` + ``meter.call``
  with manual usage, on SQLite and on PostgreSQL,
- an instrumented OpenAI client against tests/fake_llm.py's FakeLLMServer, once
  ``AiMetering`` has ``instrument`` (skipped, and said so, until then).

Each figure is the best of ``BENCH_HTTP_ROUNDS`` wrk runs of
``BENCH_HTTP_SECONDS`` after a one-second warm-up. Beside req/s each row gives the CPU time per
request, over all rounds, of the gunicorn workers (``worker_cpu_ms``) and of the store the
route talks to (``store_cpu_ms``: redis-server for Flask-Limiter on Redis, the bench
database's PostgreSQL backends; SQLite runs inside the workers). ``BENCH_HTTP_MODES`` (``sync``,
``threads``) and ``BENCH_HTTP_ROUTES`` (e.g. ``quota,metered``) narrow a run. p50/p99 are wrk's latency
percentiles. The soak (``python -m bench http-soak``, or ``BENCH_HTTP_SOAK=1``
with ``python -m bench http``) sends ``BENCH_HTTP_SOAK_REQUESTS`` (100,000) to
the metered route and reports the workers' RSS before and after.

Needs wrk on PATH (Debian: ``apt-get install wrk``); without it the HTTP bench
is skipped with a message. Redis at ``BENCH_HTTP_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``); PostgreSQL as the other benches
(``AI_METERING_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

from bench import common
from bench.http_app import BILLABLE
from bench.http_app import PLAN
from bench.http_app import metering_app

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_HTTP_REDIS_URL", "redis://127.0.0.1:6379/0")
WRK_THREADS = 2
WRK_CONNECTIONS = 16
WORKERS = 2
#: (label, gunicorn arguments, threads per worker)
MODES = (("2 sync workers", [], 1), ("2 workers x 8 threads", ["--threads", "8"], 8))
BASELINE = "limiter-redis"

#: wrk's summary as one JSON line (latencies in microseconds).
_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d,'
    .. ' "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def missing_wrk_message() -> str:
    return (
        "wrk not found on PATH: the HTTP bench is skipped. Install it with `apt-get install wrk`"
        " (Debian/Ubuntu) or build it from https://github.com/wg/wrk, then run `python -m bench http`."
    )


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except Exception:
        return False


# -- databases ---------------------------------------------------------------------------------


@contextlib.contextmanager
def database(backend: str) -> t.Iterator[str]:
    """A fresh database, migrated by ``flask ai-metering db upgrade``, with the bench billable
    subscribed to an unlimited-in-practice plan; dropped afterwards."""
    with common.database(backend, _prepare) as url:
        yield url


def _prepare(url: str) -> None:
    from flask_ai_metering.models import Plan

    app, db, meter = metering_app(url)
    result = app.test_cli_runner().invoke(args=["ai-metering", "db", "upgrade"])
    if result.exit_code != 0:
        raise RuntimeError(f"flask ai-metering db upgrade failed: {result.output}") from result.exception
    with app.app_context():
        db.session.add(Plan(name=PLAN, slug=PLAN, token_limit=10**15, cost_limit=Decimal("1000000")))
        db.session.commit()
        meter.subscribe(BILLABLE, PLAN)
        db.session.remove()
        db.engine.dispose()


def usage_rows(url: str) -> int:
    from flask_ai_metering.models import Usage

    app, db, _ = metering_app(url)
    with app.app_context():
        count = db.session.scalar(sa.select(sa.func.count()).select_from(Usage))
        db.session.remove()
        db.engine.dispose()
    return int(count or 0)


# -- gunicorn ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def gunicorn(route: str, extra: list[str], threads: int, env: dict[str, str]) -> t.Iterator[tuple[int, int]]:
    """Serve ``route`` on a free port; yields (port, master pid). Stops the master it started."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--workers",
        str(WORKERS),
        *extra,
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "bench.http_app:create_app()",
    ]
    full_env = {
        **os.environ,
        **env,
        "BENCH_HTTP_ROUTE": route,
        "BENCH_HTTP_POOL_SIZE": str(threads + 2),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, port, log)
            yield port, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: t.IO[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200 and len(worker_pids(proc.pid)) == WORKERS:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not answer /ping within 60 s")


def worker_pids(master: int) -> list[int]:
    """The gunicorn workers: the children of the master."""
    try:
        return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                    pids.append(int(stat.parent.name))
        return pids


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- wrk ---------------------------------------------------------------------------------------


def wrk(port: int, seconds: float) -> dict[str, t.Any]:
    """One wrk run against ``/bench``: requests, req/s, p50/p99 in ms, errors."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA)
    try:
        out = subprocess.run(
            [
                wrk_path() or "wrk",
                f"-t{WRK_THREADS}",
                f"-c{WRK_CONNECTIONS}",
                f"-d{max(1, math.ceil(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}/bench",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "requests": raw["requests"],
        "req_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
    }


def measure(
    port: int, seconds: float, rounds: int, workers: t.Sequence[int] = (), store: t.Callable[[], list[int]] = list
) -> dict[str, t.Any]:
    """Best of ``rounds`` wrk runs (by req/s) after a one-second warm-up.

    Also the CPU time per request, over all rounds, of the gunicorn ``workers`` and of the
    ``store``'s processes (Redis, or the bench database's PostgreSQL backends): on 2 shared
    cores a route is as fast as its total CPU per request, and this says where it goes.
    """
    wrk(port, 1)
    store_pids = store()
    worker_cpu, store_cpu = cpu_seconds(workers), cpu_seconds(store_pids)
    runs = [wrk(port, seconds) for _ in range(rounds)]
    requests = sum(r["requests"] for r in runs) or 1
    best = max(runs, key=lambda r: r["req_per_s"])
    return {
        **best,
        "errors": sum(r["errors"] for r in runs),
        "worker_cpu_ms": (cpu_seconds(workers) - worker_cpu) / requests * 1000,
        "store_cpu_ms": (cpu_seconds(store_pids) - store_cpu) / requests * 1000 if store_pids else None,
    }


def cpu_seconds(pids: t.Iterable[int]) -> float:
    """User + system CPU seconds the processes have used (those that still run)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def redis_pids() -> list[int]:
    """The local redis-server processes (the Flask-Limiter baseline's store)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "redis-server":
                pids.append(int(comm.parent.name))
    return pids


def _store(backend: str, route: str, urls: dict[str, str]) -> t.Callable[[], list[int]]:
    """The processes of the store a route talks to, whose CPU the row reports (none for SQLite)."""
    if backend == "postgresql":
        return postgres_backends(urls[backend])
    return redis_pids if route == "limiter-redis" else list


def postgres_backends(url: str) -> t.Callable[[], list[int]]:
    """The PostgreSQL backends serving the bench database (read after the warm-up, when the pools are full)."""

    def pids() -> list[int]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                query = (
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                return [int(pid) for pid in conn.exec_driver_sql(query).scalars()]
        finally:
            engine.dispose()

    return pids


# -- the benches -------------------------------------------------------------------------------


def _routes() -> list[str]:
    from flask_ai_metering import AiMetering

    routes = ["quota", "metered"]
    if hasattr(AiMetering, "instrument"):
        routes.append("instrumented")
    return routes


@contextlib.contextmanager
def _fake_llm() -> t.Iterator[dict[str, str]]:
    """The local OpenAI wire-format server, for the instrumented route (issue 14's later part)."""
    from tests.fake_llm import FakeLLMServer

    server = FakeLLMServer().start()
    try:
        yield {"BENCH_HTTP_FAKE_LLM_URL": server.url}
    finally:
        server.stop()


def _modes() -> tuple[tuple[str, list[str], int], ...]:
    """``BENCH_HTTP_MODES`` (``sync``, ``threads`` or both, comma-separated; default both)."""
    wanted = os.environ.get("BENCH_HTTP_MODES", "sync,threads").split(",")
    return tuple(m for m in MODES if ("threads" if m[2] > 1 else "sync") in wanted)


def run(backends: list[str], seconds: float | None = None, rounds: int | None = None) -> list[dict[str, t.Any]]:
    if wrk_path() is None:
        print(missing_wrk_message(), file=sys.stderr)
        return []
    quick = os.environ.get("BENCH_QUICK") == "1"
    seconds = seconds or float(os.environ.get("BENCH_HTTP_SECONDS", "2" if quick else "5"))
    rounds = rounds or int(os.environ.get("BENCH_HTTP_ROUNDS", "1" if quick else "2"))
    routes = _routes()
    if "instrumented" not in routes:
        print("http: instrumented OpenAI client skipped (AiMetering has no `instrument` yet)", file=sys.stderr)
    if os.environ.get("BENCH_HTTP_ROUTES"):
        routes = [r for r in routes if r in os.environ["BENCH_HTTP_ROUTES"].split(",")]
    baselines = ["plain", "limiter-memory"] + (["limiter-redis"] if redis_available() else [])
    if BASELINE not in baselines:
        print(f"http: Redis not reachable at {REDIS_URL}: no Flask-Limiter Redis baseline", file=sys.stderr)
    rows: list[dict[str, t.Any]] = []
    with contextlib.ExitStack() as stack:
        urls = {backend: stack.enter_context(database(backend)) for backend in backends}
        fake = stack.enter_context(_fake_llm()) if "instrumented" in routes else {}
        for label, extra, threads in _modes():
            bench = (
                f"HTTP req/s, gunicorn {label} (wrk {WRK_THREADS} threads, {WRK_CONNECTIONS} connections,"
                f" {seconds:g} s, best of {rounds})"
            )
            group: list[dict[str, t.Any]] = []
            plan = [("-", route, {"BENCH_HTTP_REDIS_URL": REDIS_URL}) for route in baselines] + [
                (backend, route, {"BENCH_HTTP_DATABASE_URL": urls[backend], **fake})
                for backend in backends
                for route in routes
            ]
            for backend, route, env in plan:
                print(f"  http {label}: {route} {backend}", file=sys.stderr)
                store = _store(backend, route, urls)
                with gunicorn(route, extra, threads, env) as (port, master):
                    result = measure(port, seconds, rounds, worker_pids(master), store)
                group.append(
                    {
                        "bench": bench,
                        "backend": backend,
                        "route": route,
                        "req_per_s": round(result["req_per_s"]),
                        "p50_ms": round(result["p50_ms"], 2),
                        "p99_ms": round(result["p99_ms"], 2),
                        "errors": result["errors"],
                        "worker_cpu_ms": round(result["worker_cpu_ms"], 3),
                        "store_cpu_ms": "" if result["store_cpu_ms"] is None else round(result["store_cpu_ms"], 3),
                    }
                )
            base = next((r["req_per_s"] for r in group if r["route"] == BASELINE), None)
            for row in group:
                row["vs_limiter_redis"] = round(row["req_per_s"] / base, 2) if base else "n/a"
            rows += group
    if os.environ.get("BENCH_HTTP_SOAK") == "1":
        rows += soak(backends)
    return rows


def soak(backends: list[str], requests: int | None = None) -> list[dict[str, t.Any]]:
    """Worker RSS before and after ``requests`` to the metered route, per backend and worker mode."""
    if wrk_path() is None:
        print(missing_wrk_message(), file=sys.stderr)
        return []
    requests = requests or int(os.environ.get("BENCH_HTTP_SOAK_REQUESTS", "100000"))
    wanted = os.environ.get("BENCH_HTTP_SOAK_MODES", "sync,threads").split(",")
    modes = [m for m in MODES if ("threads" if m[2] > 1 else "sync") in wanted]
    rows = []
    for backend in backends:
        for label, extra, threads in modes:
            with database(backend) as url:
                print(f"  http soak {label}: metered {backend}, {requests:,} requests", file=sys.stderr)
                with gunicorn("metered", extra, threads, {"BENCH_HTTP_DATABASE_URL": url}) as (port, master):
                    wrk(port, 2)  # warm-up: imports, pools and caches are in place before "before"
                    pids = worker_pids(master)
                    before = {pid: rss_kib(pid) for pid in pids}
                    sent, errors, started = 0, 0, time.perf_counter()
                    rate = 200.0
                    while sent < requests:
                        chunk = wrk(port, min(60, max(1, (requests - sent) / rate)))
                        sent += chunk["requests"]
                        errors += chunk["errors"]
                        rate = max(chunk["req_per_s"], 1.0)
                    elapsed = time.perf_counter() - started
                    after = {pid: rss_kib(pid) for pid in pids if Path(f"/proc/{pid}").exists()}
                    restarted = sorted(set(worker_pids(master)) - set(pids))
                recorded = usage_rows(url)
            total_before, total_after = sum(before.values()), sum(after.values())
            rows.append(
                {
                    "bench": "HTTP soak, metered route: worker RSS",
                    "backend": backend,
                    "workers": label,
                    "requests": sent,
                    "req_per_s": round(sent / elapsed),
                    "errors": errors,
                    "usage_rows": recorded,
                    "rss_before_mib": " + ".join(f"{before[p] / 1024:.1f}" for p in pids),
                    "rss_after_mib": " + ".join(f"{after[p] / 1024:.1f}" for p in pids if p in after),
                    "growth_pct": round((total_after - total_before) / total_before * 100, 1),
                    "workers_restarted": len(restarted),
                }
            )
            # Each row as it is measured: a soak is long, and an interrupted one keeps what it measured.
            print(f"    {json.dumps(rows[-1])}", file=sys.stderr)
    return rows
