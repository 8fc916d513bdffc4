"""The web UI in a real browser: `animatediff ui` started as a subprocess on a free port, driven
by Playwright through Debian's headless Chromium, on the built-in model at small sizes.

Needs gradio, playwright and /usr/bin/chromium (`.ci/install-browser`); skipped without them.
Screenshots of the main screens go to $ANIMATEDIFF_SCREENSHOTS when set (docs/ui/ holds the
committed ones: `ANIMATEDIFF_SCREENSHOTS=docs/ui pytest tests/test_ui.py`), else to a temporary
folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import animatediff
from animatediff import builtin
from animatediff.cli.main import main
from animatediff.video import read_video

CHROMIUM = Path("/usr/bin/chromium")
# .ci/run sets this: there a missing browser or extra is a broken set-up, not a reason to skip.
REQUIRED = os.environ.get("ANIMATEDIFF_UI_REQUIRED") == "1"
for ready, why in (
    (CHROMIUM.exists(), "needs Debian's chromium (.ci/install-browser)"),
    (importlib.util.find_spec("gradio") is not None, "needs gradio: pip install -e '.[ui]'"),
    (importlib.util.find_spec("playwright") is not None, "needs playwright (the test extra)"),
):
    if not ready and REQUIRED:
        raise RuntimeError(f"ANIMATEDIFF_UI_REQUIRED=1 but the browser tests {why}")
    if not ready:
        pytest.skip(why, allow_module_level=True)
sync_api = importlib.import_module("playwright.sync_api")

pytestmark = [pytest.mark.ui, pytest.mark.slow]

# Chromium's own background connections are refused on a closed network; switch them off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "a red circle moving on a blue background"
START_TIMEOUT_S = 240  # importing torch, diffusers and gradio on a busy 2-core machine
RUN_TIMEOUT_MS = 120_000
REF_MODULE = Path(__file__).parent / "data" / "official_tiny" / "mm_v1.ckpt"


# -- the server and the browser ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`animatediff ui` on a model folder holding one MotionLoRA under a name of its own."""
    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    models.mkdir()
    (models / "my-camera-move.ckpt").write_bytes(builtin.motion_lora("pan-left").read_bytes())
    # a motion module for another base (four UNet levels; the built-in base has three)
    (models / "other-motion.ckpt").write_bytes(REF_MODULE.read_bytes())
    src = str(Path(animatediff.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",  # as this process (conftest): the same frames bit for bit
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    argv = ["ui", "--port", str(port), "--models", str(models), "--outputs", str(root / "outputs")]
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "animatediff.cli.main", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_server(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # Failures are messages in the page; a traceback from this package's code is a bug. (Gradio
    # logs its own refusal of the forged request below with one.)
    assert "/animatediff/" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#generate")
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("ANIMATEDIFF_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- page helpers --------------------------------------------------------------------------------
def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(str(value))


def choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    options = page.locator(f"#{box.get_attribute('aria-controls')}")  # this dropdown's list
    options.get_by_role("option", name=option, exact=True).click()


def settings(page, steps: int, frames: int = 8, seed: int = 1, prompt: str = PROMPT) -> None:
    fill(page, "prompt", prompt)
    fill(page, "frames", frames)
    fill(page, "steps", steps)
    fill(page, "seed", seed)


def generate_and_wait(page, seed: int) -> None:
    page.click("#generate")
    page.wait_for_selector("#progress [data-state=done]")
    page.wait_for_function(f"document.querySelector('#result-info').innerText.includes('{seed}')")


def download(page, elem_id: str, target: Path) -> Path:
    with page.expect_download() as info:
        page.click(f"#{elem_id}")
    info.value.save_as(target)
    return target


def shown_animation(page) -> Image.Image:
    """The animation the page shows, fetched from its <img> as the browser does."""
    src = page.locator("#result img").get_attribute("src")
    data = page.request.get(src).body()
    return Image.open(io.BytesIO(data))


def message(page) -> str:
    page.wait_for_selector("#message [role=alert]")
    return page.locator("#message").inner_text()


# -- tests ---------------------------------------------------------------------------------------
def test_generate_shows_the_animation_and_the_mp4_decodes(page, tmp_path, shots):
    settings(page, steps=4, frames=8, seed=11)
    generate_and_wait(page, 11)
    image = shown_animation(page)
    assert image.format == "GIF" and image.n_frames == 8 and image.size == (64, 64)
    natural = page.locator("#result img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [64, 64]
    info = page.locator("#result-info").inner_text()
    assert "Seed 11" in info and "8 frames" in info and "64x64" in info
    mp4 = read_video(download(page, "download-mp4", tmp_path / "result.mp4"))
    gif = read_video(download(page, "download-gif", tmp_path / "result.gif"))
    assert mp4.shape == gif.shape == (3, 8, 64, 64)
    assert (mp4 - gif).abs().mean() < 0.05  # H.264 is lossy, but it is the same animation
    page.screenshot(path=shots / "generate.png", full_page=True)


def test_motion_lora_and_personal_style_round_trip_through_the_cli(page, tmp_path, shots):
    settings(page, steps=3, frames=8, seed=21)
    page.get_by_role("tab", name="Models").click()
    choose(page, "personal", "stripes (built-in)")
    choose(page, "motion-lora-1", "zoom-in (built-in)")
    choose(page, "motion-lora-2", "my-camera-move.ckpt")  # recognised by its content
    page.screenshot(path=shots / "models.png")
    generate_and_wait(page, 21)
    page.click("#copy-command")
    command = page.locator("#command .cm-content").inner_text().strip()
    assert "--personal stripes" in command and "--motion-lora zoom-in:1" in command
    assert "my-camera-move.ckpt:1" in command and "--seed 21" in command
    page.screenshot(path=shots / "command.png", full_page=True)
    shown = read_video(download(page, "download-gif", tmp_path / "page.gif"))
    argv = shlex.split(command)
    assert main([*argv[1:], "-o", str(tmp_path / "cli.gif")]) == 0
    assert torch.equal(read_video(tmp_path / "cli.gif"), shown)
    config = download(page, "save-config", tmp_path / "animation.yaml")
    assert main(["generate", "--config", str(config), "-o", str(tmp_path / "cfg")]) == 0
    (from_config,) = (tmp_path / "cfg").glob("000-*.gif")  # beside it: the grid, sample.gif
    assert torch.equal(read_video(from_config), shown)


def test_cancel_stops_a_run(page, shots):
    settings(page, steps=400, frames=16, seed=31)
    page.click("#generate")
    page.wait_for_function(
        "Number(document.querySelector('#progress [data-state=running]')?.dataset.step) >= 2"
    )
    assert "ETA" in page.locator("#progress").inner_text()
    page.screenshot(path=shots / "progress.png")
    page.click("#cancel")
    page.wait_for_function(
        "document.querySelector('#message').innerText.includes('cancelled at step')"
    )
    text = page.locator("#message").inner_text()
    step = int(text.split("cancelled at step")[1].split()[0])
    assert step < 400
    page.wait_for_selector("#progress [data-state=idle]")
    assert page.locator("#generate").is_enabled()


def test_two_runs_queue_one_after_the_other(browser, server, shots):
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    first, second = (c.new_page() for c in contexts)
    try:
        for page, steps, seed in ((first, 40, 41), (second, 3, 42)):
            page.set_default_timeout(RUN_TIMEOUT_MS)
            page.goto(server)
            page.wait_for_selector("#generate")
            settings(page, steps=steps, frames=16, seed=seed)
        first.click("#generate")
        first.wait_for_selector("#progress [data-state=running]")
        second.click("#generate")
        second.wait_for_selector("#progress [data-state=queued]")
        assert "1 generation ahead" in second.locator("#progress").inner_text()
        second.screenshot(path=shots / "queued.png")
        first.wait_for_selector("#progress [data-state=done]")
        # the second starts only now: it cannot have finished before the first
        second.wait_for_selector("#progress [data-state=done]")
        assert "Seed 42" in second.locator("#result-info").inner_text()
    finally:
        for context in contexts:
            context.close()


def test_bad_input_is_a_message_not_a_traceback(page, tmp_path, shots):
    settings(page, steps=3, seed=51)
    fill(page, "width", 100)
    page.click("#generate")
    assert "width: 100 is not a multiple of 8 (try 96)" in message(page)
    page.screenshot(path=shots / "error.png")
    fill(page, "width", 64)
    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture at all")
    page.get_by_role("tab", name="Control").click()
    page.locator("#init-image input[type=file]").set_input_files(str(fake))
    page.wait_for_selector("#init-image :text('holiday.png')")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').innerText.includes('init image')")
    assert "init image: not a readable image" in page.locator("#message").inner_text()
    page.locator("#init-image button[aria-label='Clear']").click()
    # a failure while generating: a motion module that does not fit the base
    page.get_by_role("tab", name="Models").click()
    choose(page, "motion-module", "other-motion.ckpt (v1)")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').innerText.includes('does not fit')")
    assert "motion module does not fit this UNet" in page.locator("#message").inner_text()
    assert "Traceback" not in page.content()
    choose(page, "motion-module", "built-in (v3)")  # the server recovered: this one runs
    generate_and_wait(page, 51)


def test_gallery_survives_a_reload(page, shots):
    settings(page, steps=3, seed=61)
    generate_and_wait(page, 61)
    page.reload()
    page.wait_for_selector("#gallery img")
    thumbnails = page.locator("#gallery button.thumbnail-item")
    assert thumbnails.count() >= 1
    thumbnails.first.click()
    page.wait_for_selector("#result img")
    assert "Seed 61" in page.locator("#result-info").inner_text()  # the newest result
    page.screenshot(path=shots / "gallery.png", full_page=True)
    page.click("#reuse-settings")  # the form as it was for that result
    page.wait_for_function("document.querySelector('#seed input').value === '61'")
    assert page.locator("#steps input").input_value() == "3"
    assert page.locator("#prompt textarea").input_value() == PROMPT


def test_closing_the_page_cancels_its_run(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#generate")
    settings(page, steps=500, frames=16, seed=71)
    page.click("#generate")
    page.wait_for_selector("#progress [data-state=running]")
    context.close()  # no cancel: the page is simply gone
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(RUN_TIMEOUT_MS)
        page.goto(server)
        page.wait_for_selector("#generate")
        settings(page, steps=2, seed=72)
        started = time.monotonic()
        generate_and_wait(page, 72)
        # 500 steps would take minutes; the abandoned run stopped instead
        assert time.monotonic() - started < 60
    finally:
        context.close()


def api_generate(server: str, change: dict, session: str) -> bool:
    """Send the generate event as the page does, with `change` ({label: value}) applied to the
    page's defaults; True when it succeeded."""
    config = json.load(urllib.request.urlopen(server + "config"))
    components = {c["id"]: c["props"] for c in config["components"]}
    fn_index, event = next(
        (i, d) for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "generate"
    )
    labels = [components[c].get("label") for c in event["inputs"]]
    data = [components[c].get("value") for c in event["inputs"]]
    for label, value in change.items():
        data[labels.index(label)] = value
    body = dict(data=data, fn_index=fn_index, session_hash=session, trigger_id=event["id"])
    request = urllib.request.Request(
        server + "gradio_api/queue/join",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).read()
    url = f"{server}gradio_api/queue/data?session_hash={session}"
    for line in urllib.request.urlopen(url, timeout=RUN_TIMEOUT_MS / 1000):
        if b"process_completed" in line:
            return json.loads(line.decode().removeprefix("data:"))["success"]
    raise AssertionError("the event did not complete")


def test_a_forged_request_cannot_name_a_server_file(server):
    """The page sends uploads; a request naming a file on the server instead is refused."""
    change = {"Prompt": PROMPT, "Frames": 8, "Steps": 2}
    assert api_generate(server, change, "plain-request")  # the request itself is well formed
    forged = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    assert not api_generate(server, {**change, "Init image": forged}, "forged-request")
