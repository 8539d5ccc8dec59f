"""Run an ASGI app (cxr.serving.serve's) with uvicorn on 127.0.0.1 in a background thread, for tests.

    with running(create_app(service)) as url:
        urllib.request.urlopen(url + "/health")

The socket is bound before uvicorn starts (port 0: the system picks a free one), so there is no
race for the port; leaving the `with` asks uvicorn to exit and joins its thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def running(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a free loopback port; yields its base URL (no trailing slash)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # log_config=None: uvicorn's loggers propagate to the root logger, so pytest's caplog sees them
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, workers=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def post_file(
    url: str, filename: str | None, data: bytes | None, field: str = "file", timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    """POST one file as multipart/form-data (`data` None: an empty form) → (status, JSON body)."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    if data is not None:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from PATH (Debian's `chromium` and `chromium-driver`), or None."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def headless_chromium(width: int = 1000, height: int = 1300) -> Iterator[Any]:
    """A Selenium WebDriver on headless Chromium (no download: the binaries on PATH are used)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver not on PATH; apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)  # no sandbox: CI runs as root, where Chromium's sandbox refuses to start
    driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def upload_in_page(driver: Any, url: str, image: Any, timeout: float = 60.0) -> dict[str, str]:
    """Open the page at `url`, choose `image` in its file input, wait for the answer; returns the
    texts of the result cells as a person sees them (name, label, reason, probability, threshold,
    band, ood, caption, status, error; a hidden cell reads ""), the page state, `finding`
    (yes/no: whether the answer is a finding), `probability_class` (not-meaningful when greyed) and
    `overlay_width` (0: no Grad-CAM overlay drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.find_element(By.ID, "file").send_keys(str(image))
    result = driver.find_element(By.ID, "result")
    WebDriverWait(driver, timeout).until(lambda d: result.get_attribute("data-state") in ("done", "error"))
    out = {
        key: driver.find_element(By.ID, key).text
        for key in (
            "name",
            "probability",
            "label",
            "reason",
            "threshold",
            "band",
            "ood",
            "caption",
            "status",
            "error",
            "intended-use",
        )
    }
    out["state"] = result.get_attribute("data-state")
    out["finding"] = result.get_attribute("data-finding") or ""
    out["probability_class"] = driver.find_element(By.ID, "probability").get_attribute("class") or ""
    overlay = driver.find_element(By.ID, "overlay")
    out["overlay_width"] = str(
        driver.execute_script("return arguments[0].hidden ? 0 : arguments[0].naturalWidth;", overlay)
    )
    return out
