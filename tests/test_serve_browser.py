"""The review page in a real browser: headless Chromium driven through Selenium.

Starts `python -m prosona_jax.serve` on a free port (`serve_url`, conftest; the model is
`styles_export`, whose two prompts give different masks), loads the page, uploads a bad
file (the page shows the error) and then a PNG, enters two prompts, moves the slider
between them, and checks that the masks appear, differ, and that the slider's ends are
the two prompts' masks. It saves a screenshot (`$PROSONA_SERVE_SCREENSHOT` if set, else in
the test's folder).

Needs the `serve` extra, selenium, chromium and chromium-driver (bash scripts/setup.sh
--serve): skipped without them, failed under CI=true.
"""

import os
import shutil

import pytest

import serve_browser
from conftest import STYLE_CORE, STYLE_MARGIN, missing, serve_extra_missing
from test_serve import FREE_TEXT, synthetic_png


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
  reason = serve_extra_missing() or serve_browser.browser_missing()
  if reason:
    missing(reason)
  d = serve_browser.chrome(str(tmp_path_factory.mktemp("chromium_profile")))
  yield d
  d.quit()


def test_page_uploads_segments_two_prompts_and_slides(serve_url, driver, tmp_path):
  (tmp_path / "broken.png").write_bytes(b"this is not a PNG")
  (tmp_path / "lesion.png").write_bytes(synthetic_png())
  serve_browser.open_page(driver, serve_url)

  serve_browser.upload(driver, str(tmp_path / "broken.png"))
  error = serve_browser.wait(driver, "(e => !e.hidden && e.textContent)"
                                     "(document.getElementById('error'))")
  assert error.startswith("broken.png: not a readable PNG"), error

  serve_browser.upload(driver, str(tmp_path / "lesion.png"))  # The server goes on.
  serve_browser.wait(driver, "document.getElementById('error').hidden && "
                             "document.querySelectorAll('#results .result').length > 0")
  first = serve_browser.segment(driver, [STYLE_CORE, FREE_TEXT])
  assert [r["prompt"] for r in first] == [STYLE_CORE, FREE_TEXT]
  core, margin = serve_browser.segment(driver, [STYLE_CORE, STYLE_MARGIN])
  for r in (core, margin):
    assert r["mask"].startswith("data:image/png;base64,") and r["area"] > 0, r
  assert core["mask"] != margin["mask"] and core["area"] < margin["area"]

  start = serve_browser.slide(driver, "HOME")
  end = serve_browser.slide(driver, "END")
  assert (start["alpha"], end["alpha"]) == (0.0, 1.0)
  assert start["mask"] == core["mask"] and end["mask"] == margin["mask"]
  middle = serve_browser.slide(driver, "ARROW_LEFT")
  assert middle["alpha"] == pytest.approx(0.95)
  assert serve_browser.samples_shown(driver, 6) == 6  # The server runs with --samples=6.
  assert driver.execute_script("return document.getElementById('error').hidden;")

  shot = os.environ.get("PROSONA_SERVE_SCREENSHOT") or str(tmp_path / "serve.png")
  assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
  if shot != str(tmp_path / "serve.png"):
    shutil.copy(shot, tmp_path / "serve.png")
