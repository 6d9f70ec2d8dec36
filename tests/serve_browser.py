r"""Drives the review page (`python -m prosona_jax.serve`) in headless Chromium.

Used by tests/test_serve_browser.py, and run by hand for the README's screenshot:

  python tests/serve_browser.py http://127.0.0.1:8765/ --case=synth0002_slice00002 \
      --prompt="solid core only" --prompt="include the faint zone with a generous margin" \
      --out=docs/serve.png

Chromium is Debian's (`chromium`, `chromium-driver`), driven through Selenium with the
driver's path given, so that nothing is downloaded; it runs with the flags a closed
network needs (no background connections) and a fresh empty profile.
"""

import argparse
import shutil
import tempfile

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
# Waits are generous: the machine the tests run on may be loaded.
WAIT_S = 120


def browser_missing() -> str | None:
  """Why the browser test cannot run here, or None."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("selenium") is None:
    return "selenium is not installed (bash scripts/setup.sh --serve)"
  absent = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
  if absent:
    return (f"{' and '.join(absent)} not found (Debian: apt-get install chromium "
            "chromium-driver; scripts/setup.sh --serve does it as root)")
  return None


def chrome(profile: str, size: tuple[int, int] = (1280, 1000)):
  """Headless Chromium with an empty profile folder `profile`."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",
                                f"--window-size={size[0]},{size[1]}"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait(driver, script: str, timeout: float = WAIT_S):
  """Waits until the JavaScript expression `script` is truthy; returns its value."""
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
      lambda d: d.execute_script(f"return ({script});"))


# Every mask image of a selector has loaded (an <img> that failed has naturalWidth 0).
_LOADED = ("[...document.querySelectorAll('{0} img.mask')].length >= {1} && "
           "[...document.querySelectorAll('{0} img')].every(i => i.complete && i.naturalWidth)")


def open_page(driver, url: str) -> None:
  driver.get(url)
  wait(driver, "document.getElementById('prompt1') !== null")


def upload(driver, path: str) -> None:
  """Chooses `path` in the file input (the page uploads it at once)."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  driver.execute_script("document.getElementById('error').hidden = true;")
  driver.find_element(By.ID, "file").send_keys(path)


def load_case(driver, key: str) -> None:
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select  # pylint: disable=g-import-not-at-top
  wait(driver, "!document.getElementById('case-box').hidden")
  Select(driver.find_element(By.ID, "case")).select_by_value(key)
  driver.find_element(By.ID, "load-case").click()


def results(driver) -> list[dict]:
  """The prompt panels: prompt, area, mask data URL."""
  return driver.execute_script("""
    return [...document.querySelectorAll('#results .result')].map(f => ({
      prompt: f.querySelector('.prompt-text').textContent,
      area: parseInt(f.querySelector('.area').textContent, 10),
      mask: f.querySelector('img.mask').src}));""")


def segment(driver, prompts: list[str]) -> list[dict]:
  """Types the prompts (as many rows as needed), presses Segment, waits for the masks."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  while len(driver.find_elements(By.CSS_SELECTOR, "#prompts .prompt")) < len(prompts):
    driver.find_element(By.ID, "add-prompt").click()
  for field, text in zip(driver.find_elements(By.CSS_SELECTOR, "#prompts .prompt"), prompts):
    field.clear()
    field.send_keys(text)
  driver.find_element(By.ID, "run").click()
  wait(driver, f"[...document.querySelectorAll('#results .result .prompt-text')]"
               f".map(b => b.textContent).join('\\n') === {prompts_js(prompts)}")
  wait(driver, _LOADED.format("#results", len(prompts)))
  wait(driver, _LOADED.format("#mix-row", 1))
  return results(driver)


def prompts_js(prompts: list[str]) -> str:
  import json  # pylint: disable=g-import-not-at-top
  return json.dumps("\n".join(prompts))


def slide(driver, key: str) -> dict:
  """Moves the slider between the first two prompts with a key (HOME, END, ARROW_LEFT,
  ...) and waits for the mask of its new position; returns alpha, area and mask."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  slider = driver.find_element(By.ID, "mix")
  slider.send_keys(getattr(Keys, key))
  value = float(slider.get_attribute("value"))
  wait(driver, f"(p => p && Math.abs(parseFloat(p.dataset.alpha) - {value}) < 1e-9)"
               "(document.getElementById('mix-panel'))")
  wait(driver, _LOADED.format("#mix-row", 1))
  return driver.execute_script("""
    const p = document.getElementById('mix-panel');
    return {alpha: parseFloat(p.dataset.alpha),
            area: parseInt(p.querySelector('.area').textContent, 10),
            mask: p.querySelector('img.mask').src};""")


def samples_shown(driver, count: int) -> int:
  wait(driver, _LOADED.format("#samples", count))
  return driver.execute_script("return document.querySelectorAll('#samples figure').length;")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("url")
  parser.add_argument("--image", help="A file to upload.")
  parser.add_argument("--case", help="A test-fold case to load (servers with --workdir).")
  parser.add_argument("--prompt", action="append", default=[])
  parser.add_argument("--slider", default="", help="Keys for the slider, e.g. HOME,ARROW_RIGHT")
  parser.add_argument("--size", default="1280,1000")
  parser.add_argument("--out", required=True, help="Screenshot PNG.")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as profile:
    driver = chrome(profile, tuple(int(v) for v in args.size.split(",")))
    try:
      open_page(driver, args.url)
      if args.case:
        load_case(driver, args.case)
      else:
        upload(driver, args.image)
      wait(driver, "document.querySelectorAll('#results .result').length > 0")
      if args.prompt:
        segment(driver, args.prompt)
      for key in filter(None, args.slider.split(",")):
        slide(driver, key)
      driver.save_screenshot(args.out)
    finally:
      driver.quit()


if __name__ == "__main__":
  main()
