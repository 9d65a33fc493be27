"""Every ```python block in README.md and docs/**/*.md runs here, so no example can rot.

The convention, also told to readers in docs/guides/index.md:

- The blocks of one page run in order, in one namespace, as if pasted one after the
  other into ``flask shell``. Each block is its own test (``README.md:57``).
- README.md and the pages directly under docs/ stand on their own. A page under
  docs/guides/ first runs the *prelude*: the one block whose fence reads
  ```` ```python prelude ```` (in docs/guides/index.md). It builds ``app``, ``db``,
  ``meter``, ``client``, ``anthropic_client`` and ``team``, and pushes an app context.
- A block that cannot run here (it needs a Celery worker, a collector, your own
  package) says so on its fence: ```` ```python no-run ````. They are few, and counted.

What the reader does by hand, the harness does before a page: the working directory
is a fresh folder whose ``instance/app.db`` is already migrated (the pages'
``flask ai-metering db upgrade``), and ``OPENAI_*``/``ANTHROPIC_*`` point the SDKs'
default clients at the local wire-format server (tests/fake_llm.py), so
``OpenAI()`` works offline and free.
"""

from __future__ import annotations

import contextvars
import dataclasses
import shutil
import typing as t
from pathlib import Path

import pytest

from tests.fake_llm import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
PRELUDE_PAGE = ROOT / "docs" / "guides" / "index.md"
#: Blocks marked ``no-run`` across all pages; raise it only with a reason.
MAX_NO_RUN = 6


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    flags: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with the words after ``python`` as flags."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    fence: str | None = None
    info: list[str] = []
    start = 0
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```") or stripped.startswith("~~~"):
                marker = stripped[: len(stripped) - len(stripped.lstrip(stripped[0]))]
                fence, info, start, body = marker, stripped[len(marker) :].split(), number, []
            continue
        if stripped.startswith(fence) and not stripped[len(fence) :].strip():
            if info and info[0] == "python":
                found.append(Block(page, start, "\n".join(body) + "\n", frozenset(info[1:])))
            fence = None
        else:
            body.append(line)
    return found


def uses_prelude(page: Path) -> bool:
    return page.parent != ROOT and page.parent.name == "guides" and page != PRELUDE_PAGE


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUNNABLE = [block for block in ALL_BLOCKS if "no-run" not in block.flags]


def prelude() -> Block:
    (block,) = [b for b in blocks_of(PRELUDE_PAGE) if "prelude" in b.flags]
    return block


class PageRun:
    """One page's namespace, app contexts and working directory, kept across its block tests."""

    def __init__(self, page: Path, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.namespace: dict[str, t.Any] = {"__name__": "docs_example"}
        # App contexts pushed by a page stay in the page's own context, not the test's.
        self.context = contextvars.copy_context()
        self.done: set[str] = set()
        self.failed: str | None = None
        self.steps = [b for b in blocks_of(page) if "no-run" not in b.flags]
        if uses_prelude(page):
            self.steps.insert(0, prelude())

    def run_through(self, target: Block) -> None:
        """Run the page's blocks up to and including ``target``, each once."""
        for step in self.steps:
            if step.id not in self.done:
                if self.failed:
                    pytest.fail(f"not run: the earlier block {self.failed} on this page failed")
                try:
                    # Padded so that tracebacks show the page's own line numbers.
                    code = compile("\n" * step.line + step.code, str(step.page), "exec")
                    self.context.run(exec, code, self.namespace)
                except BaseException:
                    self.failed = step.id
                    raise
                self.done.add(step.id)
            if step == target:
                return

    def close(self) -> None:
        """Dispose the page's engines and close its SDK clients."""
        from flask import Flask
        from flask_sqlalchemy import SQLAlchemy

        values = list(self.namespace.values())
        for app in [v for v in values if isinstance(v, Flask)]:
            db = app.extensions.get("sqlalchemy")
            if isinstance(db, SQLAlchemy):
                with app.app_context():
                    for engine in db.engines.values():
                        engine.dispose()
        for value in values:
            if type(value).__module__.startswith(("openai", "anthropic")) and hasattr(type(value), "close"):
                value.close()


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> t.Iterator[dict[Path, PageRun]]:
    """Each page's run, made on first use in a fresh folder with a migrated ``instance/app.db``."""

    class Runs(dict[Path, PageRun]):
        def __missing__(self, page: Path) -> PageRun:
            folder = tmp_path_factory.mktemp(page.stem)
            (folder / "instance").mkdir()
            shutil.copy(sqlite_template, folder / "instance" / "app.db")
            self[page] = PageRun(page, folder)
            return self[page]

    runs = Runs()
    yield runs
    for run in runs.values():
        run.close()


@pytest.fixture
def docs_env(llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    """The environment a reader's shell would have: API keys, here aimed at the local server."""
    llm.reset()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-docs-example")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{llm.url}/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-docs-example")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", llm.url)
    monkeypatch.delenv("FLASK_APP", raising=False)
    return llm


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_docs_example(
    block: Block, page_runs: dict[Path, PageRun], docs_env: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = page_runs[block.page]
    monkeypatch.chdir(run.folder)
    run.run_through(block)


def test_blocks_are_found() -> None:
    """The collector sees the pages' blocks, and the no-run escape hatch stays small."""
    assert len(RUNNABLE) >= 40, [b.id for b in RUNNABLE]
    skipped = [b.id for b in ALL_BLOCKS if "no-run" in b.flags]
    assert len(skipped) <= MAX_NO_RUN, skipped
    assert prelude().code.strip()
    for block in ALL_BLOCKS:
        assert block.flags <= {"no-run", "prelude"}, f"{block.id}: unknown flags {sorted(block.flags)}"


def test_configuration_page_lists_every_key() -> None:
    """docs/configuration.md has a row for every ``ConfigVars`` key."""
    from flask_ai_metering.config import ConfigVars

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = [value for name, value in vars(ConfigVars).items() if name.isupper()]
    assert [key for key in keys if f"| `{key}` |" not in page] == []
