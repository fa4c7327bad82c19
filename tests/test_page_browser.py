"""The page at ``GET /`` in a real browser: Debian's headless chromium, driven by selenium
through chromium-driver, against a live ``apd serve`` of the shipped checkpoint on loopback.

Each test uses the page as a person would (uploads a PNG, draws with the mouse, types K and a
seed, presses Predict) and reads the answer off the page; the numbers shown must be those of a
direct ``POST /predict/image`` of the same image file (same K and seed), to display precision.
The page sends the image file as it is (an upload's bytes unchanged, a drawing as a PNG) and
the server makes the model's input (service/codecs/images.py, tested in tests/test_images.py); here
what it makes of what the page sent is checked against independent references: an MNIST test
digit, uploaded large and black on white, must come back as that digit (white on black, 28x28,
in [0, 1]).

Without chromium the browser tests skip locally and fail in CI (``CI=true`` or
``REQUIRE_BROWSER=1``; ``.ci/run`` installs chromium and chromium-driver). With
``APD_PAGE_SCREENSHOT=path.png`` the upload test saves a screenshot of the answer there
(docs/page.png is made so).
"""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from service.codecs.images import mnist_input
from tests.harness import ROOT, ServeProcess, apd_serve

SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
MAX_K = 200
K = 40
SEED = 11
WAIT_S = 30.0
SCREENSHOT_ENV = "APD_PAGE_SCREENSHOT"
SCREENSHOT_INDEX = 115  # an MNIST test 4 that could be a 9 (the shipped model hesitates)
SIDE = 28
SPLIT_MIN_SHARE = 0.02  # page.js: below this share of ln C the uncertainty is not split
# Not a host the page loads: the SVG namespace its script names when it creates elements.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def _required() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true"} or bool(
        os.environ.get("REQUIRE_BROWSER")
    )


def _unavailable(message: str) -> NoReturn:
    if _required():
        pytest.fail(f"{message}; CI or REQUIRE_BROWSER is set, so the page must be tested")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    args = ["--max-num-samples", str(MAX_K), "--pool-size", "100"]
    with apd_serve(SHIPPED, args=args, env={"APD_REDIS_URL": ""}, timeout=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if chromium is None or not Path(driver_exe).exists():
        _unavailable(
            "Debian's chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,1000",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",  # full-page screenshots keep the window's layout width
        # Any host but loopback fails to resolve: the page must work offline.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    # performance: every request the browser makes (Network.requestWillBeSent events)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_exe)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# ---------- images ----------


def mnist_test_image(index: int) -> tuple[NDArray[np.float64], int] | None:
    """MNIST test image ``index`` as 28x28 in [0, 1], and its label, if the data set is here."""
    data_dir = Path(os.environ.get("APD_DATA_DIR", ROOT.parent / "shared" / "data"))
    images = data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    labels = data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    with gzip.open(images, "rb") as f:
        raw = f.read(16 + SIDE * SIDE * (index + 1))
    with gzip.open(labels, "rb") as f:
        label = f.read(8 + index + 1)[8 + index]
    pixels = np.frombuffer(raw[16 + SIDE * SIDE * index :], dtype=np.uint8)
    return pixels.reshape(SIDE, SIDE) / 255.0, int(label)


def drawn_seven() -> NDArray[np.float64]:
    """A 7 drawn with Pillow and laid out as MNIST lays out its digits (NIST's strokes scaled
    into a 20x20 box, centre of mass at the centre of 28x28): white on black, in [0, 1]."""
    img = Image.new("L", (280, 280), 0)
    pen = ImageDraw.Draw(img)
    pen.line([(60, 50), (220, 50), (120, 240)], fill=255, width=26, joint="curve")
    left, top, right, bottom = img.getbbox() or (0, 0, 280, 280)
    scale = 20 / max(right - left, bottom - top)
    size = (round((right - left) * scale), round((bottom - top) * scale))
    box = np.asarray(img.crop((left, top, right, bottom)).resize(size, Image.Resampling.BOX))
    box = box.astype(np.float64) / 255.0
    rows, cols = np.indices(box.shape)
    top_left = [round(SIDE / 2 - (g * box).sum() / box.sum()) for g in (rows, cols)]
    digit = np.zeros((SIDE, SIDE))
    digit[top_left[0] : top_left[0] + size[1], top_left[1] : top_left[1] + size[0]] = box
    return digit


def digit_png(digit: NDArray[np.float64], path: Path) -> Path:
    """``digit`` scaled up tenfold and inverted, black on white as on paper: the page must
    detect the light background, invert, crop and scale it back down."""
    grey = np.round(255 * (1.0 - digit)).astype(np.uint8)
    Image.fromarray(grey).resize((280, 280), Image.Resampling.BILINEAR).save(path)
    return path


# ---------- reading the page ----------


def wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        logs = "\n".join(str(e) for e in driver.get_log("browser"))
        pytest.fail(f"timed out waiting for {what}; browser log:\n{logs}")


def open_page(driver: Any, server: ServeProcess) -> None:
    from selenium.webdriver.common.by import By

    driver.get_log("browser")  # drop what earlier tests left
    driver.get(server.base_url + "/")
    wait(
        driver,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true",
        "the page to read GET /v1/model",
    )


def wait_for_preview(driver: Any, source: str) -> None:
    """Until the preview shows what is sent from ``source`` (a file name or the drawing)."""
    from selenium.webdriver.common.by import By

    wait(
        driver,
        lambda d: f"from {source}:" in d.find_element(By.ID, "preview-caption").text,
        f"the preview of {source}",
    )


def set_field(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def predict(driver: Any) -> str:
    """Press Predict and wait for the answer; returns the result's state (done or error)."""
    from selenium.webdriver.common.by import By

    submit = driver.find_element(By.ID, "submit")
    wait(driver, lambda d: submit.is_enabled(), "the Predict button to be enabled")
    result = driver.find_element(By.ID, "result")
    driver.execute_script("arguments[0].dataset.state = 'idle'", result)
    submit.click()
    return str(
        wait(
            driver,
            lambda d: result.get_attribute("data-state") in {"done", "error"} and result,
            "the answer",
        ).get_attribute("data-state")
    )


def shown_answer(driver: Any) -> dict[str, Any]:
    """What a reader sees: label, table of probabilities, bars, flag, K, uncertainty."""
    from selenium.webdriver.common.by import By

    def text(element_id: str) -> str:
        return str(driver.find_element(By.ID, element_id).get_attribute("textContent")).strip()

    rows = driver.find_elements(By.CSS_SELECTOR, "#prob-table tbody tr")
    table = {
        str(r.find_element(By.TAG_NAME, "th").get_attribute("textContent")): float(
            str(r.find_element(By.TAG_NAME, "td").get_attribute("textContent"))
        )
        for r in rows
    }
    bars = driver.find_elements(By.CSS_SELECTOR, "#chart svg rect.bar")
    terms = driver.find_elements(By.CSS_SELECTOR, "#uncertainty-values dt")
    values = driver.find_elements(By.CSS_SELECTOR, "#uncertainty-values dd")
    flag = driver.find_element(By.ID, "flag")
    preview = str(driver.find_element(By.ID, "preview").get_attribute("src"))
    assert preview.startswith("data:") and ";base64," in preview, preview[:60]
    return {
        "sent": base64.b64decode(preview.split(",", 1)[1]),
        "sent_name": json.loads(text("request-json"))["files"][0],
        "split": driver.find_element(By.ID, "uncertainty").get_attribute("data-split"),
        "percentages": "%" in text("uncertainty-values"),
        "label": text("label"),
        "table": table,
        "bars": {
            str(b.get_attribute("data-class")): float(str(b.get_attribute("data-probability")))
            for b in bars
        },
        "top_bars": len(driver.find_elements(By.CSS_SELECTOR, "#chart svg rect.bar.top")),
        "flag": flag.get_attribute("data-anomaly"),
        "flag_text": flag.text,
        "num_samples": text("num-samples"),
        "model_variance": text("model-variance"),
        "data_support": text("data-support")
        if driver.find_elements(By.ID, "data-support")
        else None,
        "uncertainty": {
            # "0.0021 (72%)": the value, then its share of the total
            str(t.get_attribute("textContent")): float(
                str(v.get_attribute("textContent")).split()[0]
            )
            for t, v in zip(terms, values, strict=True)
        },
        "gauge_text": text("gauge-text"),
        "request": json.loads(text("request-json")),
        "visible": driver.find_element(By.ID, "result-body").is_displayed(),
    }


def check_against_api(server: ServeProcess, shown: dict[str, Any]) -> dict[str, Any]:
    """The page's numbers are a direct ``POST /predict/image`` of the file it sent."""
    request = shown["request"]
    assert request["num_samples"] == K and request["seed"] == SEED
    assert request["files"] == [shown["sent_name"]]
    res = httpx.post(
        server.base_url + "/predict/image",
        files={"files": (shown["sent_name"], shown["sent"])},
        data={"num_samples": str(K), "seed": str(SEED)},
        timeout=30,
    )
    assert res.status_code == 200, res.text
    answer = res.json()
    pred = answer["predictions"][0]
    probs = pred["probabilities"]
    assert shown["visible"]
    assert shown["label"] == str(pred["label"])
    assert shown["table"].keys() == {str(i) for i in range(len(probs))}
    for i, p in enumerate(probs):
        assert shown["table"][str(i)] == pytest.approx(p, abs=5e-4 + 1e-9)
        assert shown["bars"][str(i)] == pytest.approx(p, rel=1e-6)
    assert shown["top_bars"] == 1
    assert shown["flag"] == ("true" if pred["anomaly"]["is_anomaly"] else "false")
    assert ("Anomaly: flagged" in shown["flag_text"]) == pred["anomaly"]["is_anomaly"]
    assert shown["num_samples"] == str(answer["num_samples"]) == str(K)
    u = pred["uncertainty"]
    expected = {
        "Total (predictive entropy)": u["predictive_entropy"],
        "Aleatoric (expected entropy)": u["expected_entropy"],
        "Epistemic (mutual information)": u["mutual_information"],
    }
    for name, value in expected.items():
        assert shown["uncertainty"][name] == pytest.approx(value, abs=5e-5 + 1e-3 * value)
    assert float(shown["model_variance"]) == pytest.approx(u["model_variance"], rel=1e-2)
    if "data_support" in u:  # the distance from the training data, beside the combined flag
        assert float(shown["data_support"]) == pytest.approx(u["data_support"], rel=1e-2)
    assert f"{pred['anomaly']['threshold']:.4f}" in shown["gauge_text"]
    if pred["anomaly"]["score_name"] == "combined":
        assert "distance from the training data" in shown["gauge_text"]
    return answer


def sent_image(shown: dict[str, Any]) -> NDArray[np.float64]:
    """The model's input that the server makes of the image file the page sent."""
    image = mnist_input(shown["sent"]).astype(np.float64).reshape(SIDE, SIDE)
    assert image.min() >= 0.0 and image.max() <= 1.0
    return image


def save_full_page(driver: Any, path: Path) -> None:
    """A PNG of the whole page, beyond the window's height (Chrome DevTools Protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    # 256 colours, undithered: a third of the size, and flat colours stay flat.
    image.quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


def assert_no_console_errors(driver: Any) -> None:
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"the browser logged errors: {errors}"


# ---------- tests ----------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"src", "href"} and v]


def test_page_and_assets_are_served_by_the_app_alone(server: ServeProcess) -> None:
    """Runs without a browser: the page, its script and style come from the app with their
    content types and a CSP of 'self', and none of them names another host."""
    base = server.base_url
    page = httpx.get(base + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    refs = _Refs()
    refs.feed(page.text)
    local = [u for u in refs.urls if not u.startswith("data:")]
    assert {"page/page.js", "page/page.css"} <= set(local)
    types = {".js": "text/javascript", ".css": "text/css"}
    bodies = [page.text]
    for url in local:
        res = httpx.get(f"{base}/{url}", timeout=10)
        assert res.status_code == 200, url
        suffix = Path(url).suffix
        if suffix in types:
            assert res.headers["content-type"].startswith(types[suffix])
            bodies.append(res.text)
    for body in bodies:
        hosts = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"<>)]*", body, flags=re.I)
        assert [h for h in hosts if h != SVG_NAMESPACE] == []
    assert httpx.get(base + "/page/index.html", timeout=10).status_code == 404
    assert httpx.get(base + "/page/..%2Fpage.py", timeout=10).status_code == 404
    assert "/" not in httpx.get(base + "/openapi.json", timeout=10).json()["paths"]


def requested_urls(driver: Any) -> list[str]:
    """The URLs the browser requested since the performance log was last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(str(message["params"]["request"]["url"]))
    return urls


# Each page the app serves, and an element that shows it has rendered (its script has run).
RENDERED = {
    "/": "body[data-ready='true']",
    "/docs": ".swagger-ui .info .title",
    "/redoc": ".menu-content",
}


@pytest.mark.parametrize("path", list(RENDERED))
def test_no_request_leaves_the_machine(browser: Any, server: ServeProcess, path: str) -> None:
    """Chrome's own record of every request a page made (its performance log): all go to
    this server; none to a CDN, font host or validator, though they would fail here anyway."""
    from selenium.webdriver.common.by import By

    browser.get_log("performance")  # drop what earlier tests left
    browser.get(server.base_url + path)
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, RENDERED[path]),
        f"{path} to render",
    )
    time.sleep(1.0)  # what a page fetches once rendered (ReDoc's logo) is requested by now
    urls = requested_urls(browser)
    own = [u for u in urls if u.startswith(server.base_url)]
    assert own, f"the performance log shows no request to the server: {urls}"
    remote = [
        u
        for u in urls
        if urlsplit(u).scheme not in {"data", "blob", "about", "chrome"}
        and urlsplit(u).hostname not in {"127.0.0.1", "localhost", "::1"}
    ]
    assert not remote, f"{path} made requests off this machine: {remote}"


def test_uploaded_digit(browser: Any, server: ServeProcess, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    mnist = mnist_test_image(0)  # a 7
    digit = mnist[0] if mnist is not None else drawn_seven()
    png = digit_png(digit, tmp_path / "seven.png")
    open_page(browser, server)
    model_line = browser.find_element(By.ID, "model-line").text
    assert "mnist-fcnn1" in model_line and "10 classes" in model_line
    set_field(browser, "k", str(K))
    set_field(browser, "seed", str(SEED))
    browser.find_element(By.ID, "file").send_keys(str(png))
    wait_for_preview(browser, png.name)
    assert predict(browser) == "done"
    shown = shown_answer(browser)
    # The page sends the file as it is; the server inverts it (black on white), crops and
    # centres it: what it makes is the digit MNIST itself made.
    assert shown["sent"] == png.read_bytes()
    answer = check_against_api(server, shown)
    sent = sent_image(shown)
    corr = np.corrcoef(sent.ravel(), digit.ravel())[0, 1]
    assert corr > 0.9, f"the image sent is not the digit uploaded (correlation {corr:.3f})"
    assert shown["label"] == "7"
    assert shown["flag"] == "false"
    # A confident 7: almost no uncertainty, so no split of it into aleatoric and epistemic.
    total = answer["predictions"][0]["uncertainty"]["predictive_entropy"]
    assert total < SPLIT_MIN_SHARE * np.log(10), total
    assert shown["split"] == "false" and not shown["percentages"]
    assert_no_console_errors(browser)
    screenshot = os.environ.get(SCREENSHOT_ENV)
    if screenshot:
        # For the docs, a digit the model hesitates on shows more: a 4 that could be a 9.
        ambiguous = mnist_test_image(SCREENSHOT_INDEX)
        if ambiguous is not None:
            browser.find_element(By.ID, "file").send_keys(
                str(digit_png(ambiguous[0], tmp_path / "four.png"))
            )
            wait_for_preview(browser, "four.png")
            assert predict(browser) == "done"
            check_against_api(server, shown_answer(browser))
        save_full_page(browser, Path(screenshot))


def test_drawn_digit_in_a_narrow_window(browser: Any, server: ServeProcess) -> None:
    """A 7 drawn with the mouse on a phone-sized window: what is sent is the stroke,
    MNIST-centred, and the layout fits the width."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 900)
    try:
        open_page(browser, server)
        browser.find_element(By.CSS_SELECTOR, 'input[name="source"][value="draw"]').click()
        pad = browser.find_element(By.ID, "pad")
        assert pad.is_displayed()
        browser.execute_script("arguments[0].scrollIntoView()", pad)
        size = pad.size
        w, h = size["width"], size["height"]
        # Offsets from the pad's centre: a bar across the top, then a diagonal down-left.
        path = [(-0.3, -0.32), (0.3, -0.32), (-0.08, 0.36)]
        points = [path[0]]
        for (x0, y0), (x1, y1) in itertools.pairwise(path):
            points += [(x0 + t * (x1 - x0), y0 + t * (y1 - y0)) for t in np.linspace(0, 1, 12)[1:]]
        pixels = [(round(x * w), round(y * h)) for x, y in points]
        chain = ActionChains(browser)
        chain.move_to_element_with_offset(pad, *pixels[0]).click_and_hold()
        for (ax, ay), (bx, by) in itertools.pairwise(pixels):
            chain.move_by_offset(bx - ax, by - ay)
        chain.release().perform()
        wait_for_preview(browser, "drawing.png")
        set_field(browser, "k", str(K))
        set_field(browser, "seed", str(SEED))
        assert predict(browser) == "done"
        shown = shown_answer(browser)
        check_against_api(server, shown)
        sent = sent_image(shown)
        ink = np.argwhere(sent > 0.1)
        rows, cols = ink[:, 0], ink[:, 1]
        # MNIST's layout: the longer side of the ink's box is 20 pixels, centre of mass central.
        assert max(np.ptp(rows), np.ptp(cols)) + 1 in {19, 20, 21}
        com = np.array([(sent * g).sum() / sent.sum() for g in np.indices(sent.shape)])
        assert np.all(np.abs(com - SIDE / 2) <= 1.0), com  # MNIST's: (14, 14) on average
        # The bar of the 7 is on top: the top third holds a wide horizontal run of ink.
        top = sent[: int(rows.min()) + 4]
        assert (top.max(axis=0) > 0.5).sum() >= 10
        assert shown["label"] == "7"
        width = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert width[0] <= width[1], f"the page overflows a narrow window: {width}"
        assert_no_console_errors(browser)
    finally:
        browser.set_window_size(1200, 1000)


def test_api_errors_are_shown(browser: Any, server: ServeProcess, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    png = digit_png(drawn_seven(), tmp_path / "seven.png")
    browser.find_element(By.ID, "file").send_keys(str(png))
    wait_for_preview(browser, png.name)
    set_field(browser, "k", str(MAX_K + 1))
    assert predict(browser) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    # The API's own 422 message, naming the field and the server's limit.
    direct = httpx.post(
        server.base_url + "/predict/image",
        files={"files": (png.name, png.read_bytes())},
        data={"num_samples": str(MAX_K + 1)},
        timeout=30,
    )
    assert direct.status_code == 422
    assert error.text == f"The API answered 422: {direct.json()['message']}"
    assert "num_samples" in error.text and str(MAX_K) in error.text
    assert not browser.find_element(By.ID, "result-body").is_displayed()
    # Corrected, the same page answers and the error goes away.
    set_field(browser, "k", str(K))
    assert predict(browser) == "done"
    assert not error.is_displayed()


def test_an_uncertain_input_shows_the_split(
    browser: Any, server: ServeProcess, tmp_path: Path
) -> None:
    """Where there is uncertainty to split (an X, like no digit), the page shows its
    aleatoric and epistemic shares, as the API's numbers give them."""
    from selenium.webdriver.common.by import By

    img = Image.new("L", (200, 200), 0)
    pen = ImageDraw.Draw(img)
    pen.line([(30, 30), (170, 170)], fill=255, width=20)
    pen.line([(170, 30), (30, 170)], fill=255, width=20)
    path = tmp_path / "cross.png"
    img.save(path)
    open_page(browser, server)
    set_field(browser, "k", str(K))
    set_field(browser, "seed", str(SEED))
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait_for_preview(browser, path.name)
    assert predict(browser) == "done"
    shown = shown_answer(browser)
    answer = check_against_api(server, shown)
    u = answer["predictions"][0]["uncertainty"]
    assert u["predictive_entropy"] >= SPLIT_MIN_SHARE * np.log(10), u
    assert shown["split"] == "true" and shown["percentages"]
    share = u["expected_entropy"] / (u["expected_entropy"] + u["mutual_information"])
    values = str(browser.find_element(By.ID, "uncertainty-values").text)
    assert f"({100 * share:.0f}%)" in values, (values, share)
    assert_no_console_errors(browser)
