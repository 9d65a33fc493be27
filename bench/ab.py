"""A/B of ``meter.call``'s p50 between two checkouts, interleaved: ``python -m bench.ab BASE NEW``.

Each round runs each tree in its own process (its own code first on ``sys.path``, so an
editable install of either does not leak in), alternating which goes first, on a fresh
database; the ratio of the medians is what to read, since the machine's noise falls on
both alike. For example, against a worktree of an earlier commit::

    git worktree add --detach ../base <commit>
    python -m bench.ab ../base . postgresql 8

Writes ``bench/results/<stamp>-ab.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.__main__ import RESULTS

CHILD = r"""
import json, os, statistics, sys
sys.path.insert(0, os.getcwd())
import flask_ai_metering
assert flask_ai_metering.__file__.startswith(os.getcwd()), flask_ai_metering.__file__
from bench import overhead
from bench.common import add_plan, database, make_app

backend, calls = sys.argv[1], int(sys.argv[2])
response = overhead._chat_completion()
with database(backend) as url:
    app, db, meter = make_app(url)
    with app.app_context():
        add_plan(db, "bench", token_limit=10**15, cost_limit="1000000")
        meter.subscribe(("Team", "ab"), "bench")

        def call():
            return meter.call(lambda: response, billable=("Team", "ab"), provider="openai",
                              model="gpt-4o-mini", max_tokens=2000, feature="chat")

        overhead._time(call, 100)
        print(json.dumps(statistics.median(overhead._time(call, calls))))
"""


def run(base: Path, new: Path, backend: str = "postgresql", rounds: int = 6, calls: int = 800) -> dict[str, object]:
    trees = {"base": base.resolve(), "new": new.resolve()}
    p50s: dict[str, list[float]] = {name: [] for name in trees}
    for index in range(rounds):
        order = list(trees.items()) if index % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, backend, str(calls)], cwd=tree, env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            p50s[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {name: statistics.median(values) for name, values in p50s.items()}
    return {
        "backend": backend,
        "trees": {name: str(tree) for name, tree in trees.items()},
        "p50_ms_per_round": p50s,
        "median_p50_ms": medians,
        "new_over_base": round(medians["new"] / medians["base"], 3),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    outcome = run(Path(argv[0]), Path(argv[1]), *(argv[2:3] or ["postgresql"]), *[int(a) for a in argv[3:4]])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-ab.json").write_text(json.dumps(outcome, indent=2))
    print(json.dumps(outcome, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
