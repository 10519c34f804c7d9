"""`snakemake --report report.html` on the tiny run: one self-contained file with
the accuracy table, the plots, the stage costs and the resolved config, from
the report()-marked outputs and workflow/report/*.rst; opened in a real
headless Chromium, which renders the table and a plot without console errors."""
from __future__ import annotations

import base64
import json
import re

import pandas as pd
import pytest
import yaml

from chromium import BROWSER, Chromium
from test_pipeline import snakemake


@pytest.fixture(scope="module")
def html_report(tiny_run, tmp_path_factory):
    work, config = tiny_run
    out = tmp_path_factory.mktemp("html_report") / "report.html"
    snakemake(*config, "--report", str(out), cwd=work)
    return out, work / "results/tiny/report"


def embedded_results(page: str) -> dict[str, dict]:
    """The report's `results` (path -> entry with a base64 data URI), as its page script holds them."""
    return json.loads(re.search(r"var results = (\{.*?\});\s*</script>", page, re.DOTALL).group(1))


def decoded(entry: dict) -> bytes:
    header, data = entry["data_uri"].split(",", 1)
    assert header.endswith(";base64"), header
    return base64.b64decode(data)


def by_name(results: dict[str, dict]) -> dict[str, dict]:
    return {path.rsplit("/", 1)[-1]: entry for path, entry in results.items()}


def test_report_holds_table_plots_stage_costs_and_config(html_report):
    out, report_dir = html_report
    page = out.read_text()
    assert "<script src=" not in page and "<link " not in page  # self-contained: nothing fetched
    results = by_name(embedded_results(page))
    assert set(results) == {"table.html", "accuracy_vs_cost.png", "opd_training_curve.png", "stage_costs.html",
                            "token_budget.html", "config.html", "config.yaml"}
    # the accuracy table: every number of table.csv is in the embedded HTML table
    table = pd.read_csv(report_dir / "table.csv")
    table_html = decoded(results["table.html"]).decode()
    for value in [*table["model"], *table["synth_arith avg@2"], *table["device_hours"].map("{:g}".format)]:
        assert str(value) in table_html, value
    # the plots are the PNGs of the run, byte for byte
    for plot in ("accuracy_vs_cost.png", "opd_training_curve.png"):
        assert decoded(results[plot]) == (report_dir / plot).read_bytes()
        assert results[plot]["mime_type"] == "image/png"
    # the stage costs: every stage of the run
    stages_html = decoded(results["stage_costs.html"]).decode()
    for stage in pd.read_csv(report_dir / "stage_costs.csv")["stage"]:
        assert f"<td>{stage}</td>" in stages_html
    # the tokens per optimiser step of both OPD methods
    budget_html = decoded(results["token_budget.html"]).decode()
    assert "Lightning OPD tokens/step" in budget_html and "standard OPD tokens/step" in budget_html
    # the config: the resolved one (tiny.yaml merged over config/config.yaml)
    config = yaml.safe_load(decoded(results["config.yaml"]))
    assert config["experiment"] == "tiny" and config["eval"]["k"] == 2 and config["eval"]["tasks"] == ["synth_arith"]
    assert config["lightning_opd"]["adam_beta2"] == 0.98  # from the default, not in tiny.yaml
    assert "experiment: tiny" in decoded(results["config.html"]).decode()
    # the global description and the captions from workflow/report/, rendered with the config (docutils
    # writes @ as &#64;)
    assert "for experiment\\n<strong>tiny</strong>" in page and "Benchmarks: synth_arith, avg&#64;2" in page
    assert "Accuracy of every model on each benchmark (synth_arith):\\navg&#64;2, the mean over problems" in page


@pytest.mark.skipif(BROWSER is None, reason="no chromium: apt-get install chromium (make test installs it)")
def test_chromium_renders_the_table_and_a_plot_without_errors(html_report, tmp_path):
    out, report_dir = html_report
    table = pd.read_csv(report_dir / "table.csv")
    with Chromium() as browser:
        browser.open(out.as_uri())
        browser.wait_until("document.querySelector('#app') && document.querySelector('#app').children.length > 0")
        paths = browser.evaluate("Object.keys(results)")
        # show the accuracy table as the report's result view does (an iframe of the embedded HTML)
        table_path = next(p for p in paths if p.endswith("/table.html"))
        browser.evaluate(f"app.setView({{content: 'html', contentPath: results[{json.dumps(table_path)}].data_uri, "
                         f"resultPath: {json.dumps(table_path)}}}), true")
        frame = browser.child_frame_context()
        cells = browser.wait_until("document.readyState === 'complete' && "
                                   "[...document.querySelectorAll('td')].map(td => td.textContent)", frame)
        assert [c for c in cells if c in set(table["model"])] == table["model"].tolist()
        assert set(table["synth_arith avg@2"]) <= set(cells)
        # and a plot: an <img> the browser decoded
        plot_path = next(p for p in paths if p.endswith("/accuracy_vs_cost.png"))
        browser.evaluate(f"app.setView({{content: 'img', contentPath: results[{json.dumps(plot_path)}].data_uri, "
                         f"resultPath: {json.dumps(plot_path)}}}), true")
        width = browser.wait_until(f"(() => {{ const img = [...document.querySelectorAll('img')].find("
                                   f"i => i.src === results[{json.dumps(plot_path)}].data_uri); "
                                   "return img && img.complete && img.naturalWidth; })()")
        assert width == 990  # 9 in (the legend beside the axes) at 110 dpi
        assert browser.errors == []
