"""The `dvc plots show` page draws its charts with the network off: DVC's templated plots, rendered by vega,
vega-lite and vega-embed inlined from their npm packages (``make setup``) into the HTML template.

The browser check needs Chromium (Debian: ``apt-get install chromium``) and ``node_modules`` (``make setup``):
without them it is skipped with the reason, except under CI (``CI=true``), where it fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from support.helpers import REPO
from support.services import service_env

from stages.common.offline_plots import NODE_MODULES, SCRIPTS, MissingScripts, template_html

DVC = str(Path(sys.executable).parent / "dvc")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: headless, no GPU, no background traffic, and no network at all: every host fails to resolve, every
#: connection goes to a closed proxy port
OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                 "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000"]
FAILED_LOAD = re.compile(r"Failed to load resource|net::ERR_|Uncaught", re.I)


def missing(what: str) -> None:
    """Under CI a missing prerequisite is a failure (CI installs it); elsewhere the test is skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI installs it: .ci/run, make setup)")
    pytest.skip(what)


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    missing("no Chromium on PATH (Debian: apt-get install -y chromium)")
    raise AssertionError("unreachable")


class Charts(HTMLParser):
    """Per vega-embed container (DVC's ``<div id=...>``): whether it holds a drawn canvas or an svg."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__()
        self.ids = set(ids)
        self.drawn: dict[str, bool] = dict.fromkeys(ids, False)
        self.stack: list[str | None] = []  # the chart each open div belongs to

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        current = next((c for c in reversed(self.stack) if c), None)
        if tag == "div":
            self.stack.append(a.get("id") if a.get("id") in self.ids else None)
        elif current and (tag == "svg" and "marks" in (a.get("class") or "")
                          or tag == "canvas" and int(a.get("width") or 0) > 0):
            self.drawn[current] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.stack:
            self.stack.pop()


def render_offline(page: Path, profile: Path) -> tuple[str, str]:
    """(DOM after the scripts ran, browser log) of ``page`` in headless Chromium without a network."""
    proc = subprocess.run([browser(), *OFFLINE_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def chart_ids(page_html: str) -> list[str]:
    return re.findall(r"vegaEmbed\('#([^']+)'", page_html)


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A workspace with the evaluate stage's plots written by its own functions (a loss curve, learned ranks)."""
    from stages.common.plots import plot_loss, plot_structure

    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True, env=service_env())
    plots = repo / "data/evaluate/plots"
    plots.mkdir(parents=True)
    plot_loss(pd.DataFrame({"step": range(1, 41), "loss": [1 / (1 + 0.1 * i) for i in range(40)]}),
              plots / "training_loss.png")
    plot_structure([{"module": f"bert.encoder.layer.{i}.attention.self.query", "rank": 4 + i} for i in range(3)],
                   "dora_dr", plots / "structure.png")
    return repo


def plots_show(repo: Path, out: Path, *args: str) -> Path:
    proc = subprocess.run([DVC, "plots", "show", "-o", str(out), *args], cwd=repo, capture_output=True, text=True,
                          env=service_env())
    assert proc.returncode == 0, proc.stderr
    return out / "index.html"


def test_plots_page_draws_its_charts_with_the_network_off(plots_repo, tmp_path):
    try:
        template = template_html()
    except MissingScripts as exc:
        missing(str(exc))
    (tmp_path / "offline.html").write_text(template)
    page = plots_show(plots_repo, tmp_path / "plots", "--html-template", str(tmp_path / "offline.html"))
    html = page.read_text()
    ids = chart_ids(html)
    drawn_here = ["data_evaluate_plots_training_loss_csv", "data_evaluate_plots_structure_json"]  # written above
    assert set(drawn_here) <= set(ids), ids
    assert not re.search(r"<script[^>]+src=", html), "the page must not load any script"
    assert html.count("<script>") >= len(SCRIPTS)

    dom, log = render_offline(page, tmp_path / "profile")
    charts = Charts(ids)
    charts.feed(dom)
    assert {i: charts.drawn[i] for i in drawn_here} == dict.fromkeys(drawn_here, True), charts.drawn
    assert not [ln for ln in log.splitlines() if FAILED_LOAD.search(ln)], log[-3000:]
    assert '<img src="static/' in dom  # the PNG plots stay beside the charts


def test_dvc_default_page_draws_nothing_offline(plots_repo, tmp_path):
    """The control: DVC's own page loads the scripts from a CDN, which this browser cannot reach."""
    page = plots_show(plots_repo, tmp_path / "plots")
    dom, log = render_offline(page, tmp_path / "profile")
    charts = Charts(chart_ids(page.read_text()))
    charts.feed(dom)
    assert not any(charts.drawn.values())
    assert any(FAILED_LOAD.search(ln) for ln in log.splitlines())


def test_template_keeps_dvc_placeholders_and_leaves_out_the_cdn(tmp_path):
    for script in SCRIPTS:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / script).write_text("var x = '</script>'; // " + script)
        (tmp_path / script.split("/")[0] / "package.json").write_text('{"version": "1.2.3"}')
    html = template_html(tmp_path)
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html
    assert "'<\\/script>'" in html and "vega-embed 1.2.3" in html
    with pytest.raises(MissingScripts, match="make setup"):
        template_html(tmp_path / "nowhere")
    assert NODE_MODULES == REPO / "node_modules"
