"""docs/serve.png: the page of `reslab serve` after a Fashion-MNIST test image was dropped on it.

    .venv/bin/python benchmarks/screenshot_serve.py [--checkpoint RUN_OR_CKPT] [--image N]

Starts ``python -m reslab serve`` on a free port, opens the page in Debian's chromium
(headless, through Selenium and chromium-driver), picks test image N, waits for the bars and
the Grad-CAM overlay and saves the window. Without --checkpoint, a default model is trained for
one epoch in a temporary folder first (as benchmarks/serve_load.py does).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serve_load import default_checkpoint, start_server, test_png

ROOT = Path(__file__).resolve().parent.parent


def browser(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run folder or .pt (default: train one epoch)")
    parser.add_argument("--image", type=int, default=0, help="test image index (default 0)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    parser.add_argument("--size", default="1200x1250", help="window WxH (default 1200x1250)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or default_checkpoint(folder)
        image = Path(folder) / f"fashion-mnist-test-{args.image}.png"
        image.write_bytes(test_png(args.image))
        server, port = start_server(checkpoint, True, 32, 2.0)
        driver = browser(*(int(v) for v in args.size.split("x")))
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: d.find_element(By.ID, "explained").is_displayed())
            wait.until(
                lambda d: d.execute_script(
                    "return document.images.length > 0 && "
                    "[...document.images].every(i => i.complete)"
                )
            )
            tmp = args.out.with_suffix(".tmp.png")
            driver.save_screenshot(str(tmp))
            tmp.replace(args.out)  # never a half-written picture
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
