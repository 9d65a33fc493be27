"""The built wheel, installed in a fresh virtualenv, runs the migrations and serves the dashboard."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import flask_ai_metering
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from flask_ai_metering import AiMetering

    app = Flask("wheel_app")
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + sys.argv[1]
    db = SQLAlchemy()
    db.init_app(app)
    meter = AiMetering(app, db=db)
    meter.dashboard_authorizer(lambda user: True)
    runner = app.test_cli_runner()
    upgrade = runner.invoke(args=["ai-metering", "db", "upgrade"])
    with app.app_context():
        meter.record(billable=("Team", "1"), provider="openai", model="gpt-4o-mini",
                     usage={"input_tokens": 1000, "output_tokens": 10})
    client = app.test_client()
    page = client.get("/ai-metering/")
    scripts = [line for line in page.get_data(as_text=True).split('"') if line.endswith(".min.js")]
    plotly = client.get(scripts[0]) if scripts else None
    print(json.dumps({
        "package": flask_ai_metering.__file__,
        "upgrade": upgrade.exit_code,
        "page": page.status_code,
        "plotly": None if plotly is None else [plotly.status_code, len(plotly.data)],
    }))
    """
)


def test_wheel_in_fresh_virtualenv(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(root)],
        check=True,
        capture_output=True,
    )
    [wheel] = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # Our dependencies come from the test environment; the package itself only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [str(python), "-c", SCRIPT, str(tmp_path / "wheel.sqlite")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site))
    assert result["upgrade"] == 0
    assert result["page"] == 200
    assert result["plotly"][0] == 200 and result["plotly"][1] > 1_000_000
