"""The page of `reslab serve` in Debian's chromium, headless, driven by Selenium through
chromium-driver: an image picked on the page comes back as its predicted class and bars.
`make setup` installs chromium and chromium-driver; the test skips only where they are not."""

from __future__ import annotations

import shutil

import pytest

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.inference import predict_files

from .conftest import png
from .test_cli import start_server

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [dev] extra")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium and chromium-driver here (make setup installs them as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_shows_the_predicted_class(tiny_run, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "picked.png"
    image.write_bytes(png(5, 40, "RGB"))
    expected = predict_files(load_checkpoint(tiny_run), [str(image)], top_k=5, precision="fp32")[0]
    server, url = start_server(tiny_run, "--precision", "fp32")
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "resnet20" in b.find_element(By.ID, "model").text)
        assert [
            img.get_attribute("alt")
            for img in browser.find_elements(By.CSS_SELECTOR, "#pictures img")
        ] == ["curves"]
        browser.find_element(By.ID, "file").send_keys(str(image))
        shown = wait.until(lambda b: b.find_element(By.ID, "prediction").text)
        rows = [row.text.split("\n") for row in browser.find_elements(By.CSS_SELECTOR, "#bars li")]
        # the Grad-CAM overlay arrives after the classes and is drawn as a 224-pixel image
        wait.until(lambda b: b.find_element(By.ID, "cam").get_property("naturalWidth") == 224)
        assert browser.find_element(By.ID, "explained").is_displayed()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert shown == expected[0][0]
    assert [row[0] for row in rows] == [name for name, _ in expected]
    assert rows[0][-1] == f"{100 * expected[0][1]:.1f}%"
