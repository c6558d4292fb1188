"""report.html: the page every run writes, and `graft report`. Small real runs (a classifier whose
class name needs escaping, its expansion, a detector) are rendered in headless Chromium (Debian's
chromium and chromium-driver): the page loads with no console error and nothing from the network,
every image decodes, every figure on it equals metrics.json, and a click on a column sorts it.
Screenshots go to $GRAFT_SCREENSHOTS (else a temporary folder) for a person to look at."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from box_data import three_splits, write_yolo
from graft.cli import main
from graft.report.html import write_report_after_run
from graft.tasks.classify.report import REPORT
from helpers import make_class_folders

ODD = "a<b&c"  # a class name (folder name) that HTML must escape
TINY = ["--weights", "none", "--epochs", "2", "--fine-tune-epochs", "1", "--augment", "none", "--set", "data.num_workers=0",
        "--set", "train.device=cpu", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A classifier run (with a skipped file and a test split), its expansion, and a detector run."""
    root = tmp_path_factory.mktemp("html-report")
    data = make_class_folders(root / "data", classes={ODD: (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)})
    (data / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = {"classifier": root / "cls", "expanded": root / "cls+1", "detector": root / "det"}
    assert main(["train", "--data", str(data), "--out", str(out["classifier"]), "--model", "test_efficientnet", "--img-size", "32", "--batch-size", "8",
                 "--set", "data.test_fraction=0.2", "--set", "train.head_lr=0.01", *TINY]) == 0
    new = make_class_folders(root / "new", per_class=8, classes={"yellow": (220, 220, 40)}, seed=1)
    assert main(["expand", str(out["classifier"]), "--data", str(new), "--out", str(out["expanded"]), "--epochs", "3", "--quiet"]) == 0
    boxes = write_yolo(root / "boxes", three_splits(n_train=8, n_val=3, n_test=3))
    assert main(["train", "--data", str(boxes), "--out", str(out["detector"]), "--model", "fcos", "--set", "model.name=test_efficientnet",
                 "--img-size", "64", "--batch-size", "4", *TINY]) == 0
    return out


def shown(key: str, value, detect: bool) -> str:
    """How the page must show a figure of metrics.json, written out independently of the writer."""
    if value is None:
        return "n/a"
    percent = "accuracy" in key or key in ("old_taken_by_new", "old_detections_unchanged") or (key == "forgetting" and not detect)
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


# ---------------------------------------------------------------------------- without a browser


def test_every_run_writes_a_self_contained_page(runs) -> None:
    for kind, run in runs.items():
        page = (run / "report.html").read_text(encoding="utf-8")
        assert "http://" not in page and "https://" not in page, kind
        assert page.count('<img src="data:image/png;base64,') >= 3, kind
    cls = (runs["classifier"] / "report.html").read_text(encoding="utf-8")
    assert "a&lt;b&amp;c" in cls and ODD not in cls  # the class name is escaped everywhere
    assert "broken.jpg" in cls and 'data-metric="test_accuracy"' in cls
    assert "Old and new classes" in (runs["expanded"] / "report.html").read_text(encoding="utf-8")
    assert "Per-class AP and precision-recall" in (runs["detector"] / "report.html").read_text(encoding="utf-8")


def test_graft_report_rewrites_the_page_and_writes_elsewhere_on_request(runs, tmp_path, capsys) -> None:
    page = runs["classifier"] / "report.html"
    before = page.read_text(encoding="utf-8")
    page.write_text("stale")
    assert main(["report", str(runs["classifier"])]) == 0
    assert page.read_text(encoding="utf-8") == before and capsys.readouterr().out.strip() == str(page)
    assert main(["report", str(runs["classifier"]), "--out", str(tmp_path / "mail.html")]) == 0
    assert (tmp_path / "mail.html").read_text(encoding="utf-8") == before


def test_a_folder_that_is_not_a_finished_run_is_a_clear_error(runs, tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a finished graft run" in err and "Traceback" not in err
    (tmp_path / "snapshots").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    assert "graft train --resume" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_inputs_leave_sections_out_and_a_damaged_file_is_named(runs, tmp_path, capsys) -> None:
    run = tmp_path / "old-run"
    shutil.copytree(runs["classifier"], run, ignore=shutil.ignore_patterns("snapshots"))
    for name in ("confusion_matrix.png", "weights_report.json", "config.yaml", "splits.json"):
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Learning curves" in page and "Confusion matrix" not in page and "Weights report" not in page
    (run / "metrics.json").write_text("{ not json")
    assert main(["report", str(run)]) == 2
    assert f"{run / 'metrics.json'} cannot be read" in capsys.readouterr().err
    # at the end of a run the same failure is a warning, and the run's files stay as they are
    assert write_report_after_run(run, REPORT) is None
    assert "warning:" in capsys.readouterr().err and (run / "report.html").read_text(encoding="utf-8") == page


# ---------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        reason = "the report's browser test needs selenium and Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; under CI it must run, not skip (.ci/run installs them)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No network at all: any host name fails to resolve, so a fetch would be a console error.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("GRAFT_SCREENSHOTS") or tmp_path_factory.mktemp("report-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def full_page_screenshot(chrome, path: Path) -> None:
    size = chrome.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.parametrize("kind", ["classifier", "expanded", "detector"])
def test_the_page_in_chromium(runs, browser, screenshots, kind) -> None:
    run = runs[kind]
    browser.get_log("browser")  # only this page's messages count
    browser.get((run / "report.html").resolve().as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
    # every image decodes; nothing outside the page is referenced
    images = browser.execute_script("return Array.from(document.images, i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert len(images) >= 3 and all(ok for _, ok in images), images
    links = browser.execute_script("return Array.from(document.querySelectorAll('[src],[href]'), e => e.getAttribute('src') || e.getAttribute('href'))")
    assert all(link.startswith(("data:", "#")) for link in links), links
    assert browser.execute_script("return performance.getEntriesByType('resource').filter(r => !r.name.startsWith('data:')).length") == 0
    # every figure on the page is metrics.json's (or expand_metrics.json's), formatted as the page does
    metrics = json.loads((run / "metrics.json").read_text())
    expand = json.loads((run / "expand_metrics.json").read_text()) if (run / "expand_metrics.json").exists() else {}
    figures = dict(browser.execute_script("return Array.from(document.querySelectorAll('[data-metric]'), e => [e.dataset.metric, e.textContent])"))
    detect = kind == "detector"
    assert set(figures) >= ({"val_map", "val_map50", "test_map", "test_map50"} if detect else {"val_accuracy", "test_accuracy"})
    if expand:
        assert {"expand.old_accuracy_before", "expand.old_accuracy_after", "expand.new_accuracy", "expand.overall_accuracy", "expand.forgetting"} <= set(figures)
    for key, text in figures.items():
        value = expand[key.removeprefix("expand.")] if key.startswith("expand.") else metrics[key]
        assert text == shown(key.removeprefix("expand."), value, detect), key
    if kind == "classifier":
        assert ODD in browser.execute_script("return document.body.innerText")  # escaped in the source, shown as it is
    full_page_screenshot(browser, screenshots / f"report-{kind}.png")


def test_clicking_a_column_title_sorts_the_table(runs, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get((runs["expanded"] / "report.html").resolve().as_uri())
    table = browser.find_element(By.CSS_SELECTOR, "#per-class table.sortable")
    titles = [th.text for th in table.find_elements(By.CSS_SELECTOR, "th")]

    def column(title: str) -> list[str]:
        i = titles.index(title)
        return [tr.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-sort") for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    header = {t: th for t, th in zip(titles, table.find_elements(By.CSS_SELECTOR, "th"))}
    header["class"].click()
    names = column("class")
    assert names == sorted(names) and len(names) == 4
    header["class"].click()
    assert column("class") == sorted(names, reverse=True) and header["class"].get_attribute("aria-sort") == "descending"
    header["precision"].click()
    values = [float(v) if v else float("-inf") for v in column("precision")]
    assert values == sorted(values) and header["class"].get_attribute("aria-sort") is None
