"""The page-by-page checks of tools/mlflow_ui_check.py (selenium on MLflow 3.17's UI).

Each step opens a page as a reader would, waits for what they need to see, asserts it
and saves a screenshot (downscaled, 256 colours, to keep the PNGs small).  The selectors
are MLflow 3.17's (data-testid, aria-label, button component ids); a newer MLflow may
move them, and the error then names the step that failed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 120  # the UI loads slowly on a busy 2-core machine
EXPAND_BUTTON = "button[data-component-id$='runnamecellrenderer.tsx_46']"
# The Run Name cells' links to runs, each with its run id and the text a reader sees: the
# characters laid out left of the cell's clipped right edge, less the width of the "…" that
# text-overflow: ellipsis draws there (the DOM holds the whole name, and so does what
# selenium's .text returns).
SHOWN_RUN_NAMES = """
const shown = [];
const cells = ".ag-cell[col-id='attributes.`Run Name`'] a[href*='/runs/']";
for (const link of document.querySelectorAll(cells)) {
  const el = link.querySelector('span') || link;
  const style = getComputedStyle(el);
  let text = el.textContent;
  if (el.scrollWidth > el.clientWidth) {
    let right = el.getBoundingClientRect().left + el.clientLeft + el.clientWidth;
    for (let e = el.parentElement; e; e = e.parentElement) {
      if (getComputedStyle(e).overflowX !== 'visible') {
        right = Math.min(right, e.getBoundingClientRect().right);
      }
    }
    const ellipsis = style.textOverflow === 'ellipsis';
    if (ellipsis) {
      const ctx = document.createElement('canvas').getContext('2d');
      ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
      right -= ctx.measureText('\u2026').width;
    }
    const range = document.createRange();
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    let kept = '';
    outer: for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (let i = 0; i < node.length; i++) {
        range.setStart(node, i);
        range.setEnd(node, i + 1);
        if (range.getBoundingClientRect().right > right + 0.5) break outer;
        kept += node.data[i];
      }
    }
    text = kept + (ellipsis ? '\u2026' : '');
  }
  shown.push([link.getAttribute('href').split('/runs/')[1].split(/[/?]/)[0], text]);
}
return shown;
"""
# Columns a reader adds to compare trials: name in the column picker.
COLUMNS = ("freetf.verdict", "eval/verdict_code", "log2_free_bits_bits", "eval/ce_gap_nats",
           "eval/kl_bits")


class UICheckError(AssertionError):
    """The UI did not show what a reader needs."""


class Page:
    """A Chromium driver with the waits and screenshots the checks need."""

    def __init__(self, driver, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def open(self, url: str, *expected: str, step: str) -> None:
        self.driver.get(url)
        self.wait_for_text(*expected, step=step)
        self.close_assistant()

    def wait_for_text(self, *expected: str, step: str, absent: tuple[str, ...] = ()) -> None:
        def ready(_) -> bool:
            text = self.text()
            return all(e in text for e in expected) and not any(a in text for a in absent)
        try:
            WebDriverWait(self.driver, WAIT_S).until(ready)
        except TimeoutException:
            text = self.text()
            missing = [e for e in expected if e not in text]
            shown = [a for a in absent if a in text]
            self.screenshot(f"failed_{step}")
            raise UICheckError(f"{step}: the page ({self.driver.current_url}) does not show "
                               f"{missing}" + (f" but shows {shown}" if shown else "")) from None

    def wait_for(self, css: str, step: str, condition=lambda e: True):
        try:
            return WebDriverWait(self.driver, WAIT_S).until(
                lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, css)
                                if condition(e)), None))
        except TimeoutException:
            self.screenshot(f"failed_{step}")
            raise UICheckError(f"{step}: no {css} on {self.driver.current_url}") from None

    def close_assistant(self) -> None:
        """Close MLflow's assistant side panel (it takes a third of the screen)."""
        for button in self.driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            if button.is_displayed():
                button.click()

    def screenshot(self, name: str, width: int = 1100) -> Path:
        from PIL import Image

        time.sleep(1.0)  # let charts finish their transitions
        path = self.shots / f"mlflow_{name}.png"
        self.driver.save_screenshot(str(path))
        image = Image.open(path).convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)),
                                 Image.LANCZOS)
        image.quantize(colors=256).save(path, optimize=True)
        return path


def shown_run_names(page: Page) -> dict[str, str]:
    """The Run Name column's text for each run the table lists, by run id, as shown (cut
    by the column's width), the table scrolled from top to bottom (it draws only the rows
    in view and a few around them)."""
    driver = page.driver
    viewport = ".ag-body-viewport"
    shown: dict[str, str] = {}
    driver.execute_script(f"document.querySelector('{viewport}').scrollTop = 0")
    while True:
        time.sleep(0.5)  # the grid draws the rows of a new scroll position
        shown.update(driver.execute_script(SHOWN_RUN_NAMES))
        moved = driver.execute_script(
            f"const v = document.querySelector('{viewport}'); const top = v.scrollTop;"
            "v.scrollTop = top + 0.8 * v.clientHeight; return v.scrollTop > top;")
        if not moved:
            break
    driver.execute_script(f"document.querySelector('{viewport}').scrollTop = 0")
    return shown


def duplicate_names(shown: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The texts that more than one run of ``shown`` ((name, text shown) pairs) shows, each
    with the names of those runs."""
    names = defaultdict(list)
    for name, text in shown:
        names[text].append(name)
    return {text: sorted(found) for text, found in names.items() if len(found) > 1}


def check_names_shown(page: Page, names: dict[str, str], step: str) -> list[str]:
    """Assert the Run Name column shows every run of ``names`` (run id -> name) by a text
    of its own; those texts, in the order of ``names``."""
    shown = shown_run_names(page)
    missing = [names[run_id] for run_id in names if run_id not in shown]
    if missing:
        page.screenshot(f"failed_{step}")
        raise UICheckError(f"{step}: the Run Name column does not list {missing}")
    texts = [(names[run_id], shown[run_id]) for run_id in names]
    same = duplicate_names(texts)
    if same:
        page.screenshot(f"failed_{step}")
        raise UICheckError(f"{step}: the Run Name column shows several trials alike: "
                           + "; ".join(f"{text!r} for {', '.join(found)}"
                                       for text, found in same.items()))
    return [text for _, text in texts]


def chromium(width: int = 1400, height: int = 900):
    """Headless Chromium through selenium's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not Path(binary).is_file() or not driver:
        raise UICheckError("needs chromium and chromedriver: apt-get install -y chromium "
                           "chromium-driver (or set CHROMIUM and CHROMEDRIVER)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)



def _runs(client, experiment: str, sweep: str | None):
    from freetf.sweeps.sweep import TAG_ROLE, TAG_SWEEP

    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UICheckError(f"no experiment {experiment!r} in the store")
    query = f"tags.`{TAG_ROLE}` = 'sweep'" + (f" and tags.`{TAG_SWEEP}` = '{sweep}'"
                                              if sweep else "")
    parents = client.search_runs([found.experiment_id], query, order_by=["start_time DESC"])
    if not parents:
        raise UICheckError(f"no sweep parent run in experiment {experiment!r}")
    parent = parents[0]
    children = client.search_runs(
        [found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    if not children:
        raise UICheckError(f"sweep {parent.info.run_name!r} has no trial runs")
    return found.experiment_id, parent, children


def _sweep_view(client, experiment_id: str, sweep: str) -> tuple[str, list[str]]:
    """The id of the sweep's saved view (``<sweep>: trials``) and the names of the columns
    it shows that the experiment has (the table leaves out a column no run logged)."""
    from freetf.tracking.store import SAVED_VIEW_TAG

    experiment = client.get_experiment(experiment_id)
    logged = {key for run in client.search_runs([experiment_id], max_results=1000)
              for key in (*run.data.params, *run.data.metrics)}
    for key, value in experiment.tags.items():
        if key.startswith(SAVED_VIEW_TAG) and json.loads(value).get("name") == \
                f"{sweep}: trials":
            state = json.loads(json.loads(value)["state"])
            names = [c.split(".", 1)[1].strip("`") for c in state["selectedColumns"]
                     if c.startswith(("params.", "metrics."))]
            return key[len(SAVED_VIEW_TAG):], [n for n in names if n in logged]
    raise UICheckError(f"sweep_view: experiment {experiment.name!r} has no saved view "
                       f"'{sweep}: trials'")


def check_ui(ui: str, tracking_uri: str, experiment: str, sweep: str | None,
             shots: Path) -> list[str]:
    """Run the checks against ``mlflow ui`` at ``ui``; what was seen, one line per check."""
    from freetf.tracking import VERDICT_METRIC, mlflow_client, runs_page_url, verdict_code

    client = mlflow_client(tracking_uri)
    experiment_id, parent, children = _runs(client, experiment, sweep)
    names = {c.info.run_id: c.info.run_name for c in children}
    seen = []
    driver = chromium(1600, 900)
    page = Page(driver, shots)
    try:
        # 0. The sweep's link opens its saved view: the trials by verdict, with its columns.
        view, columns = _sweep_view(client, experiment_id, parent.info.run_name)
        page.open(runs_page_url(experiment_id, ui, view=view), *names.values(), "Group: ",
                  step="sweep_view")
        page.wait_for_text(*names.values(), *columns, step="sweep_view",
                           absent=("Detect Issues",))
        seen.append(f"the sweep's link opens its view: {len(names)} trials grouped by "
                    f"verdict, by name, with the columns {', '.join(columns)}")
        shown = check_names_shown(page, names, "sweep_view")
        seen.append(f"its Run Name column shows each trial apart: {', '.join(shown)}")
        page.screenshot("sweep_view")

        # 1. The link opens the runs table (model-training view) with the sweep's parent.
        driver.get("about:blank")  # a new page: from a shared view, 3.17's UI changing only
        # the URL's #fragment to this link stayed on its loading placeholder (seen here)
        page.open(runs_page_url(experiment_id, ui), "Run Name", parent.info.run_name,
                  step="runs_table")
        if "/runs" not in driver.current_url:
            raise UICheckError(f"runs_table: the link landed on {driver.current_url}")
        page.wait_for_text("Run Name", step="runs_table", absent=("Detect Issues",))
        seen.append(f"the runs page link opens the runs table with parent "
                    f"{parent.info.run_name!r} (model-training view)")

        # 2. Expanding the parent lists every trial.
        page.wait_for(EXPAND_BUTTON, "expand_parent").click()
        page.wait_for_text(*names.values(), step="expand_parent")
        shown = check_names_shown(page, names, "expand_parent")
        seen.append(f"expanding the parent lists its {len(names)} trials by name, shown "
                    f"apart: {', '.join(shown)}")

        # 3. The columns a reader compares can be added from the column picker.
        add_columns(page, COLUMNS)
        page.wait_for_text(*COLUMNS[1:], step="columns")  # headers (the tag's is cut)
        seen.append(f"columns added from the picker: {', '.join(COLUMNS)}")
        page.screenshot("runs_table")

        # 4. Filtering by verdict (tag, then metric) keeps exactly that verdict's trials.
        verdicts = [c.data.tags.get("freetf.verdict", "unknown") for c in children]
        verdict = min(sorted(set(verdicts)), key=verdicts.count)  # the rarest: hides most
        keep = [names[c.info.run_id] for c in children
                if c.data.tags.get("freetf.verdict") == verdict]
        drop = [n for n in names.values() if n not in keep]
        for search in (f"tags.`freetf.verdict` = '{verdict}'",
                       f"metrics.`{VERDICT_METRIC}` = {verdict_code(verdict)}"):
            code_kept = [names[c.info.run_id] for c in children
                         if c.data.metrics.get(VERDICT_METRIC) == verdict_code(verdict)]
            expected = keep if search.startswith("tags") else code_kept
            page.open(runs_page_url(experiment_id, ui, search), *expected,
                      step="verdict_filter")
            page.wait_for_text(*expected, step="verdict_filter",
                               absent=tuple(n for n in names.values() if n not in expected))
            seen.append(f"filter {search}: {len(expected)} trial(s) listed, "
                        f"{len(names) - len(expected)} hidden")
        if drop:
            page.screenshot("verdict_filter")

        # 5. The parent run: the search space as params, verdict counts, the collapse map.
        run_url = f"{ui}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
        view = "?workflowType=machine_learning"
        page.open(run_url + view, "sweep/trials", "space.", step="parent_run")
        seen.append("the parent run shows the search space (space.*) and sweep/trials_*")
        page.screenshot("parent_run")
        page.open(f"{run_url}/artifacts/report/collapse_map.png{view}", "collapse_map.png",
                  step="collapse_map")
        image = page.wait_for("img", "collapse_map", lambda e: e.is_displayed() and (
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                  e) or 0) > 200)
        width = driver.execute_script("return arguments[0].naturalWidth", image)
        seen.append(f"the parent's report/collapse_map.png renders ({width} px wide)")
        page.screenshot("collapse_map")

        # 6. Compare the trials: log2(kappa) against the CE gap, coloured by verdict code.
        query = urllib.parse.urlencode({"runs": json.dumps(list(names)),
                                        "experiments": json.dumps([experiment_id]),
                                        "workflowType": "machine_learning"})
        page.open(f"{ui}/#/compare-runs?{query}", "Parallel Coordinates Plot",
                  step="compare")
        axes = parallel_coordinates(page, ["log2_free_bits_bits"],
                                    ["eval/ce_gap_nats", VERDICT_METRIC])
        seen.append(f"compare view: parallel coordinates over {', '.join(axes)} "
                    f"(colour: {axes[-1]})")
        page.screenshot("compare_parallel_coordinates")
    finally:
        driver.quit()
    return seen


def add_columns(page: Page, columns: tuple[str, ...],
                drop: tuple[str, ...] = ("Dataset", "Source", "Models")) -> None:
    """Tick ``columns`` (and untick ``drop``) in the runs table's column picker; raise
    unless the picker then shows exactly those ticked."""
    picker = page.wait_for("[data-testid='column-selection-dropdown']", "columns",
                           lambda e: e.text == "Columns")
    picker.click()
    search = page.wait_for("input[placeholder='Search columns']", "columns")
    for name, want in [*((c, True) for c in columns), *((c, False) for c in drop)]:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        search.send_keys(name)
        node = page.wait_for(".du-bois-light-tree-treenode", "columns",
                             lambda e, n=name: e.text.strip() == n and e.is_displayed())
        if _ticked(node) != want:
            node.find_element(By.CSS_SELECTOR, ".du-bois-light-tree-checkbox").click()
        try:
            WebDriverWait(page.driver, 10).until(lambda _, n=node, w=want: _ticked(n) == w)
        except TimeoutException:
            page.screenshot("failed_columns")
            raise UICheckError(f"columns: could not {'tick' if want else 'untick'} "
                               f"{name} in the column picker") from None
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.BACKSPACE)
    picker.click()  # close the picker


def _ticked(node) -> bool:
    return "checkbox-checked" in (node.get_attribute("class") or "")


def parallel_coordinates(page: Page, params: list[str], metrics: list[str]) -> list[str]:
    """Set the compare view's parallel-coordinates plot to ``params`` and ``metrics`` (the
    last metric colours the lines); the axis titles it then draws."""
    driver = page.driver
    selects = page.driver.find_elements(By.CSS_SELECTOR, ".du-bois-light-select-multiple")
    if len(selects) < 2:
        raise UICheckError("compare: no parameter / metric pickers on the compare page")
    for select, wanted in zip(selects[:2], (params, metrics), strict=True):
        for remove in select.find_elements(By.CSS_SELECTOR,
                                           ".du-bois-light-select-selection-item-remove"):
            remove.click()
        for name in wanted:
            select.click()
            box = select.find_element(By.CSS_SELECTOR, "input")
            box.send_keys(name)
            option = page.wait_for(".du-bois-light-select-item-option", "compare",
                                   lambda e, n=name: e.get_attribute("title") == n
                                   or e.text.strip() == n)
            option.click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wanted = [*params, *metrics]

    def titles(_):
        drawn = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "g.axis-title, "
                                                      ".axis-title, text.axistitle")]
        drawn = [t for t in drawn if t] or [
            t for t in (e.text for e in driver.find_elements(By.CSS_SELECTOR, "svg text"))
            if t in wanted]
        return drawn if all(w in drawn for w in wanted) and len(set(drawn)) == len(wanted) \
            else None
    try:
        return WebDriverWait(driver, WAIT_S).until(titles)
    except TimeoutException:
        page.screenshot("failed_compare")
        raise UICheckError(f"compare: the parallel-coordinates plot does not draw the axes "
                           f"{wanted}") from None
