"""`patchgpt serve`: the web app's endpoints through Starlette's TestClient, then the page end to end in a real
headless Chromium (Debian's, driven by Playwright) against `python -m patchgpt serve CKPT --port 0`.

The browser test is skipped only where /usr/bin/chromium is missing and CI is not set; under CI it must run.
``PATCHGPT_SCREENSHOT=docs/serve.png`` keeps its screenshot there (else it goes to tmp_path);
``PATCHGPT_SERVE_CKPT=runs/x`` points it at another checkpoint (a better-trained one for that screenshot).
"""

from __future__ import annotations

import base64
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from patchgpt.cli import main
from patchgpt.config import ConfigError
from patchgpt.serve import listen, make_app
from patchgpt.tasks import load
from patchgpt.tasks.prompts import menu, parts, route

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TASKS = ["classify", "caption"]
LIMIT = 100_000          # the unit tests' upload limit (bytes)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A tiny multi-task checkpoint (classify digits, caption digit scenes), trained once for 2 steps."""
    out = tmp_path_factory.mktemp("serve") / "multi"
    assert main(["train", "multi", "--data", "classify=digits,caption=digit-scenes", "--model", "nano",
                 "--steps", "2", "--out", str(out), "--quiet", "--set", "train.eval_every=0",
                 "--set", "train.threads=1"]) == 0   # one thread: 2 spin-waiting ones stall beside a busy neighbour
    return out


@pytest.fixture(scope="module")
def task(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def client(task):
    from starlette.testclient import TestClient

    return TestClient(make_app(task, max_bytes=LIMIT, name="tiny"))


def scene() -> Image.Image:
    """A 64x64 scene of two real handwritten digits side by side (a 3 left of a 7), like ``digit-scenes``."""
    d = load_digits()
    canvas = np.zeros((64, 64), np.uint8)
    for digit, x in ((3, 6), (7, 34)):
        im = Image.fromarray((d.images[list(d.target).index(digit)] * 255 / 16).astype(np.uint8))
        canvas[20:44, x:x + 24] = np.asarray(im.resize((24, 24), Image.BILINEAR))
    return Image.fromarray(canvas)


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def ask(client, data: bytes | None, prompt: str, name: str = "scene.png"):
    files = {"image": (name, data, "image/png")} if data is not None else None
    return client.post("/api/ask", files=files, data={"prompt": prompt})


# ---- the endpoints ---------------------------------------------------------------------------------------------


def test_info_lists_the_tasks_and_their_prompts_and_the_page_needs_nothing_from_outside(client, task):
    info = client.get("/api/info").json()
    assert info["tasks"] == list(parts(task)) == TASKS
    assert info["prompts"] == menu(task) and info["max_bytes"] == LIMIT and info["name"] == "tiny"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for testid in ("file", "prompt", "ask", "answer", "task", "pictures", "error"):
        assert f'id="{testid}"' in page.text
    assert not re.search(r"(src|href)=\"?(https?:)?//", page.text) and "@import" not in page.text
    r = client.get("/api/nothing")
    assert (r.status_code, r.json()) == (404, {"error": "Not Found: GET /api/nothing"})
    assert client.get("/api/ask").status_code == 405


@pytest.mark.parametrize("prompt", TASKS)
def test_ask_answers_with_the_picked_task_and_pictures_as_data_urls(client, task, prompt):
    r = ask(client, png(scene()), prompt)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["task"] == route(task, prompt)[0].name == prompt and reply["prompt"] == prompt
    assert isinstance(reply["answer"], str) and reply["answer"]
    assert reply["result"]["image"] == "scene.png"                     # no server paths leak out
    for url in reply["pictures"]:
        assert url.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()
    assert len(reply["pictures"]) == (1 if prompt == "caption" else 0)   # captions.png; classify draws none


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16", "CMYK", "1", "F"])
def test_odd_image_modes_are_converted(client, mode):
    im = scene()
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)
    elif mode == "F":
        im = Image.fromarray(np.asarray(im).astype(np.float32) / 255)
    else:
        im = im.convert(mode)
    r = ask(client, png(im, "TIFF" if mode in ("CMYK", "F") else "PNG"), "classify")
    assert r.status_code == 200, r.text


def test_refusals_are_one_line_json_errors(client, task, monkeypatch):
    r = ask(client, b"just some text\n", "caption", name="notes.txt")
    assert (r.status_code, r.json()) == (400, {"error": "not an image: notes.txt"})
    r = ask(client, None, "caption")
    assert r.status_code == 400 and "needs an image" in r.json()["error"]
    with pytest.raises(ConfigError) as e:
        route(task, "detect")
    r = ask(client, png(scene()), "detect")
    assert (r.status_code, r.json()) == (400, {"error": str(e.value)})
    assert "not trained for detect" in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)              # 64x64 = 4096 pixels: a "bomb"
    r = ask(client, png(scene()), "caption")
    assert r.status_code == 400 and "decompression bomb" in r.json()["error"]


def test_too_large_uploads_are_413_by_content_length_and_by_size(client):
    r = ask(client, b"\0" * 300_000, "caption", name="big.png")       # refused by its Content-Length
    assert (r.status_code, r.json()) == (413, {"error": "image is 0.3 MB; the limit is 0.1 MB"})
    r = ask(client, b"\0" * (LIMIT + 1), "caption", name="big.png")   # the body fits; the file does not
    assert (r.status_code, r.json()) == (413, {"error": "image is 0.1 MB; the limit is 0.1 MB"})

    def chunks():                                                      # no Content-Length: counted as it streams
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000
    r = client.post("/api/ask", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and r.json()["error"].startswith("image is over 0.")


def test_a_busy_port_is_a_one_line_error():
    with listen("127.0.0.1", 0) as taken, pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:"):
        listen("127.0.0.1", taken.getsockname()[1]).close()


# ---- the page in a real browser --------------------------------------------------------------------------------


def browser_or_skip() -> None:
    """Skip (with the reason) without Chromium or Playwright, except under CI, where they must be there."""
    missing = [] if Path(CHROMIUM).exists() else [f"{CHROMIUM} (apt-get install chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test; missing: {', '.join(missing)}")
    if missing:
        pytest.skip(f"no browser to drive: missing {', '.join(missing)}")


class Server:
    """``python -m patchgpt serve CKPT --port 0`` in a subprocess; `url` from the line it prints."""

    def __init__(self, ckpt: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "patchgpt", "serve", str(ckpt), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url(timeout=90)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _wait_for_url(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if found:
                return found.group(1)
            if not line:
                break
        self.stop()
        raise AssertionError("patchgpt serve printed no address:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.slow
def test_the_page_answers_two_tasks_and_shows_errors_in_a_real_browser(ckpt, tmp_path):
    browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    ckpt = Path(os.environ.get("PATCHGPT_SERVE_CKPT") or ckpt)
    prompts = menu(load(ckpt))
    image = tmp_path / "scene.png"
    scene().save(image)
    shot = Path(os.environ.get("PATCHGPT_SCREENSHOT") or tmp_path / "serve.png")
    server = Server(ckpt)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1180, "height": 720})
            page.set_default_timeout(30_000)
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}")
                    if m.type == "error" and "status of 400" not in m.text else None)   # the refused upload
            page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
                    else problems.append(f"request outside: {r.url}"))
            page.goto(server.url)
            expect(page.locator("#tasks .chip")).to_have_count(len(prompts))
            expect(page.locator("#prompts button")).to_have_count(len(prompts))
            page.set_input_files("#file", str(image))
            expect(page.locator("#preview")).to_be_visible()
            expect(page.locator("#filename")).to_contain_text("scene.png")

            def answered(n: int, do, *args) -> dict:
                """The reply to the n-th ask, which `do(*args)` sets off, once the page has shown it."""
                with page.expect_response("**/api/ask") as response:
                    do(*args)
                expect(page.locator("#result")).to_have_attribute("data-asked", str(n))
                return response.value.json()

            def typed(prompt: str) -> None:
                page.fill("#prompt", prompt)
                page.click("#ask")

            def from_its_button(prompt: str) -> None:
                page.get_by_role("button", name=prompt, exact=True).click()

            pictured = False
            for n, prompt in enumerate(prompts, start=1):     # each task once: typed, then from its button
                reply = answered(n, typed if n == 1 else from_its_button, prompt)
                assert "error" not in reply, reply
                expect(page.locator("#error")).to_be_hidden()
                expect(page.locator("#task")).to_have_text(reply["task"])
                assert page.locator("#answer").text_content() == reply["answer"]
                assert page.locator("#json").text_content().startswith("{")
                expect(page.locator("#pictures img")).to_have_count(len(reply["pictures"]))
                for img in page.locator("#pictures img").all():
                    assert img.evaluate("i => i.complete && i.naturalWidth > 0")
                if n == 1 or (reply["pictures"] and not pictured):   # the screenshot: the first answer with pictures
                    page.screenshot(path=str(shot), full_page=True)
                    pictured = bool(reply["pictures"])

            notes = tmp_path / "notes.txt"
            notes.write_text("not a picture\n")
            page.set_input_files("#file", str(notes))
            reply = answered(len(prompts) + 1, page.click, "#ask")
            assert reply == {"error": "not an image: notes.txt"}
            expect(page.locator("#error")).to_have_text(reply["error"])
            expect(page.locator("#answered")).to_be_hidden()
            browser.close()
        assert not problems, problems
        assert shot.stat().st_size > 10_000
    finally:
        server.stop()
    assert server.proc.returncode in (0, 130) and "Traceback" not in "".join(server.log), "".join(server.log)
