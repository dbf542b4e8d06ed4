"""The demo page in a real browser: headless Chromium, driven by Selenium, draws on the canvas as a
person would and reads what the page shows.

Needs `pip install selenium` and Chromium with its chromedriver from the system's packages (Debian:
`apt-get install chromium chromium-driver`); skips with the reason where any of them is missing.
Selenium is handed the chromedriver it finds on PATH, so Selenium Manager, which would otherwise
look for (and download) a driver, is never run (selenium/webdriver/common/driver_finder.py: a
Service with a path "skips Selenium Manager"). Nothing is downloaded at run time.

Run as a script, it takes the README's screenshot with a trained model:

    python tests/test_demo_browser.py --checkpoint runs/mnist/checkpoint.npz --screenshot scratchvit/demo/screenshot.png
"""
import argparse
import importlib.util
import io
import math
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TINY_MODEL = dict(patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)
WAIT_S = 30



def arc(centre, radii, degrees_from, degrees_to, points=14):
    """Points along an ellipse's arc, angles in degrees clockwise from 3 o'clock (y points down)."""
    angles = [math.radians(degrees_from + (degrees_to - degrees_from) * k / (points - 1)) for k in range(points)]
    return [(centre[0] + radii[0] * math.cos(a), centre[1] + radii[1] * math.sin(a)) for a in angles]


# Digits as strokes of points (x, y) on the pad, 0..1 across and down: a "3" of two bowls, a "7" of
# two strokes (the second its cross bar).
THREE = [arc((0.49, 0.33), (0.17, 0.15), -160, 90), arc((0.48, 0.65), (0.20, 0.18), -90, 155)]
SEVEN = [[(0.27, 0.20), (0.73, 0.20), (0.63, 0.40), (0.47, 0.84)],
         [(0.40, 0.50), (0.68, 0.50)]]


def browser_skip_reason():
    """Why the browser test cannot run here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "Selenium is not installed: pip install selenium"
    if importlib.util.find_spec("PIL") is None:
        return "the demo's preprocessing needs Pillow: pip install Pillow"
    if shutil.which("chromedriver") is None:
        return "no chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    if not any(shutil.which(name) for name in BROWSERS):
        return "no Chromium or Chrome on PATH (Debian: apt-get install chromium)"
    return None


def write_tiny_checkpoint(path):
    from scratchvit.optim import AdamW
    from scratchvit.checkpoint import save_checkpoint
    from scratchvit.config import TrainConfig
    from scratchvit.vit import ViT
    model = ViT(image_size=28, num_classes=10, seed=1, **TINY_MODEL)
    save_checkpoint(path, model=model, optimizer=AdamW(list(model.parameters()), lr=1e-3),
                    config=TrainConfig(**TINY_MODEL), epoch=1, step_in_epoch=0, random_state=None, history=[])
    return path


@contextmanager
def demo_server(checkpoint):
    """The demo of `checkpoint` on a free loopback port, serving from a thread; yields its URL."""
    from scratchvit.demo import Demo, make_server
    from scratchvit.predict import load_trained_model
    model, _ = load_trained_model(checkpoint)
    demo = Demo(model)
    server = make_server(demo, "127.0.0.1", 0, log=lambda line: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        demo.close()


@contextmanager
def chromium(width=1280, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(name) for name in BROWSERS if shutil.which(name))
    for argument in ("--headless=new", f"--window-size={width},{height}", "--force-device-scale-factor=1",
                     "--no-sandbox",                  # Chromium's sandbox refuses to run as root (CI containers)
                     "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})     # the page's console, read by the test
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def draw(driver, strokes):
    """Each stroke pressed, moved through its points and released with the mouse, as WebDriver
    pointer actions, which Chromium delivers to the page as pointerdown / pointermove / pointerup."""
    from selenium.webdriver.common.action_chains import ActionChains
    pad = driver.find_element("id", "pad")
    width, height = pad.size["width"], pad.size["height"]

    def offset(point):          # WebDriver offsets are from the element's centre, in whole CSS pixels
        return round((point[0] - 0.5) * width), round((point[1] - 0.5) * height)

    for stroke in strokes:
        actions = ActionChains(driver, duration=30)
        actions.move_to_element_with_offset(pad, *offset(stroke[0])).click_and_hold()
        for point in stroke[1:]:
            actions.move_to_element_with_offset(pad, *offset(point))
        actions.release().perform()


def wait_for(driver, condition, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    state = body_data(driver, "state")
    status = driver.find_element("id", "status").text
    raise AssertionError(f"waited {WAIT_S} s for {what}; page state {state!r}, status {status!r}")


def shown_prediction(driver):
    """(the predicted digit shown, the ten percentages shown) once the page shows an answer, else None."""
    if body_data(driver, "state") != "shown":
        return None
    digit = driver.find_element("id", "prediction").text.strip()
    values = [element.text.strip() for element in driver.find_elements("css selector", "#bars .value")]
    return digit, values


def body_data(driver, name):
    return driver.find_element("tag name", "body").get_attribute(f"data-{name}")


def page_errors(driver):
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# ------------------------------------------------------------------------------------------------

SKIP_REASON = browser_skip_reason()


@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_drawing_on_the_page_shows_a_digit_and_probabilities_that_sum_to_100(tmp_path):
    from selenium.webdriver.support.select import Select
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint.npz")
    with demo_server(checkpoint) as url, chromium() as driver:
        driver.get(url)
        wait_for(driver, lambda: driver.find_elements("css selector", "#bars li"), "the bars to be laid out")
        assert driver.find_element("id", "prediction").text.strip() == "–"
        layers = driver.find_elements("css selector", "#layer option")
        assert len(layers) == TINY_MODEL["depth"]
        assert len(driver.find_elements("css selector", "#heads canvas")) == TINY_MODEL["heads"]

        draw(driver, SEVEN)
        digit, values = wait_for(driver, lambda: shown_prediction(driver), "a prediction after drawing")
        assert re.fullmatch(r"[0-9]", digit), digit
        assert len(values) == 10 and all(re.fullmatch(r"\d{1,3}\.\d%", value) for value in values), values
        percentages = [float(value[:-1]) for value in values]
        assert sum(percentages) == pytest.approx(100, abs=0.6)           # ten values rounded to 0.1%
        assert percentages[int(digit)] == max(percentages)
        top = driver.find_element("css selector", "#bars li.top .label").text.strip()
        assert top == digit

        # another layer's heads: the page asks again and shows that layer's answer
        Select(driver.find_element("id", "layer")).select_by_index(0)
        wait_for(driver, lambda: shown_prediction(driver) and body_data(driver, "layer") == "0",
                 "the heads of layer 1 after choosing it")

        driver.find_element("id", "clear").click()
        wait_for(driver, lambda: driver.find_element("id", "prediction").text.strip() == "–", "Clear to empty it")
        assert all(element.text == "" for element in driver.find_elements("css selector", "#bars .value"))
        assert page_errors(driver) == []        # no script error, nothing refused by the page's CSP


# ------------------------------------------------------------------------------------------------
# the README's screenshot

def take_screenshot(checkpoint, out, strokes=THREE, width=1240, height=800):
    """Draw `strokes` on the page served for `checkpoint` and save the page, as a small PNG, to `out`."""
    from PIL import Image
    with demo_server(checkpoint) as url, chromium(width, height) as driver:
        driver.get(url)
        wait_for(driver, lambda: driver.find_elements("css selector", "#bars li"), "the bars to be laid out")
        draw(driver, strokes)
        digit, values = wait_for(driver, lambda: shown_prediction(driver), "a prediction after drawing")
        # the window as tall as the page, so the screenshot holds all of it and no scroll bar
        page_height, frame_height = driver.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        driver.set_window_size(width, page_height + frame_height)
        time.sleep(0.5)                 # the resize, and the bars' width transition
        png = driver.get_screenshot_as_png()
        errors = page_errors(driver)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    # an adaptive palette of 256 colours: the page is flat colours and the maps, a fraction of the size
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return digit, values, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description="Take the demo page's screenshot for the README.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--screenshot", default=str(REPO_ROOT / "scratchvit" / "demo" / "screenshot.png"))
    parser.add_argument("--digit", choices=["3", "7"], default="3")
    args = parser.parse_args(argv)
    if SKIP_REASON:
        print(f"error: {SKIP_REASON}", file=sys.stderr)
        return 2
    digit, values, errors = take_screenshot(args.checkpoint, args.screenshot, THREE if args.digit == "3" else SEVEN)
    print(f"{args.screenshot}: the page shows {digit}, {' '.join(values)}; "
          f"{Path(args.screenshot).stat().st_size // 1024} KB" + (f"; page errors: {errors}" if errors else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
