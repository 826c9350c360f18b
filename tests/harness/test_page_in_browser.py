"""The results page in a real browser: headless Chromium (Debian's `chromium`, which `make test`
installs where it can) opens a two-file page of small results fixtures from disk, runs its
script, and is asked through the DevTools protocol what it shows: every table has rows with
text, every image decoded to a picture, nothing was fetched from outside the file, and a click
on a heading sorts the table. A full-page screenshot is kept beside the test's files (its
path is printed) for a person to look at."""
import base64
import json
import os
import select
import shutil
import subprocess
import time

import pytest
from page_fixtures import results_document

from eval import html_report
from eval.results import write_json_atomic

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WAIT_SECONDS = 60


def find_browser():
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe: the browser reads commands
    from its descriptor 3 and writes answers and events to 4, each message JSON ended by a
    NUL byte (the transport Puppeteer uses)."""

    def __init__(self, browser: str, profile):
        to_browser, self.commands = os.pipe()
        self.answers, from_browser = os.pipe()
        flags = ["--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", f"--user-data-dir={profile}",
                 "--window-size=1400,1000", "--disable-dev-shm-usage"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # bash puts the two pipe ends on the descriptors the browser expects.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', browser,
             *flags, "about:blank"],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.events, self.next_id = b"", [], 0

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], max(0, deadline - time.time()))
            chunk = os.read(self.answers, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("the browser stopped answering")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.time() + WAIT_SECONDS
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, event: str) -> dict:
        deadline = time.time() + WAIT_SECONDS
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found:
                self.events.remove(found)
                return found
            self.events.append(self._message(deadline))

    def close(self):
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)


# What the page shows, as the browser laid it out.
PAGE_STATE = """JSON.stringify({
  tables: Array.from(document.querySelectorAll("table")).map(t => ({
    id: t.closest("section") ? t.closest("section").id : "",
    rows: t.tBodies[0].rows.length,
    filled: Array.from(t.tBodies[0].rows).every(r => r.textContent.trim().length > 0),
    folded: t.closest("details:not([open])") !== null,
    height: t.getBoundingClientRect().height})),
  images: Array.from(document.images).map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    shownWidth: i.getBoundingClientRect().width, ...drawn(i)}))
})"""

# Each image drawn onto a 64 x 64 canvas: a figure decoded in full is opaque everywhere (its
# white background) and has more than one colour; a cut-off PNG leaves rows transparent.
DRAWN = """function drawn(image) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, 64, 64);
  const pixels = context.getImageData(0, 0, 64, 64).data;
  const colours = new Set();
  let transparent = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i + 3] < 255) transparent++;
    colours.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
  }
  return {transparent: transparent, colours: colours.size};
}
"""

SORT_TABLE3 = """(() => {
  const table = document.querySelector("#file0-table3 table");
  const column = Array.from(table.tHead.rows[0].cells)
      .findIndex(c => c.innerText.trim() == "s=0.9");
  const values = () => Array.from(table.tBodies[0].rows).map(r => r.cells[column].dataset.sort)
      .filter(v => v !== undefined).map(Number);
  table.tHead.rows[0].cells[column].click();
  const up = values();
  table.tHead.rows[0].cells[column].click();
  return JSON.stringify({up: up, down: values()});
})()"""


@pytest.fixture
def page(tmp_path):
    mask, kv = tmp_path / "mask.json", tmp_path / "kv.json"
    write_json_atomic(mask, results_document(protocol="mask"))
    write_json_atomic(kv, results_document(protocol="kv", seed=1, options={"kv_chunk": 16}))
    return html_report.write_page([mask, kv], tmp_path / "page.html")


def test_the_page_renders_in_a_real_browser(page, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium here (looked for chromium, chromium-browser, google-chrome on "
                    "PATH): `make test` installs Debian's chromium with apt-get when it runs as "
                    "root where apt-get exists; the page's parsing tests "
                    "(test_html_report.py) ran without it")
    devtools = DevTools(browser, tmp_path / "profile")
    try:
        target = devtools.send("Target.createTarget", url="about:blank")["targetId"]
        session = devtools.send("Target.attachToTarget", targetId=target,
                                flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            devtools.send(f"{domain}.enable", session)
        devtools.send("Page.navigate", session, url=page.as_uri())
        devtools.wait_for("Page.loadEventFired")
        state = json.loads(devtools.send("Runtime.evaluate", session,
                                         expression=DRAWN + PAGE_STATE,
                                         returnByValue=True)["result"]["value"])
        sorted_values = json.loads(devtools.send(
            "Runtime.evaluate", session, expression=SORT_TABLE3,
            returnByValue=True)["result"]["value"])
        size = devtools.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = devtools.send("Page.captureScreenshot", session, format="png",
                             captureBeyondViewport=True,
                             clip={"x": 0, "y": 0, "width": size["width"],
                                   "height": size["height"], "scale": 1})
        requests = [e["params"]["request"]["url"] for e in devtools.events
                    if e.get("method") == "Network.requestWillBeSent"]
    finally:
        devtools.close()
    screenshot = tmp_path / "page.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot of the page: {screenshot}")

    # the across view, then per file: provenance (2 tables), Table 3, key tokens, tasks,
    # 4 comparison tables
    assert len(state["tables"]) >= 3 + 2 * 9
    for table in state["tables"]:
        assert table["rows"] > 0 and table["filled"], table
        assert table["height"] > 0 or table["folded"], table  # the config block is folded
    assert len(state["images"]) == 2 * 4
    for image in state["images"]:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
        assert image["shownWidth"] > 100, image
        assert image["transparent"] == 0 and image["colours"] > 3, image
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
    assert sorted_values["up"] == sorted(sorted_values["up"]) and len(sorted_values["up"]) == 6
    assert sorted_values["down"] == sorted(sorted_values["up"], reverse=True)

    from PIL import Image
    with Image.open(screenshot) as image:
        assert image.width >= 1000 and image.height > 3000  # the whole page, not a window
        colours = image.convert("RGB").resize((64, 256)).getcolors(64 * 256)
        assert colours is None or len(colours) > 20  # drawn figures and tables, not blank
