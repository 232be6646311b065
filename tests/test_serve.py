"""`cascadevision serve` as a person uses it: the real server (uvicorn, in a subprocess on a free port) with a tiny
random model, a real HTTP client, and the web page in headless Chromium.

Every answer is checked against the model called directly on the same image (boxes, scores, categories, and the
masks decoded from the server's RLE compared pixel for pixel), not against the server's own code.
"""
from __future__ import annotations

import asyncio
import base64
import colorsys
import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from cascadevision.cli import main
from cascadevision.config import to_dict
from cascadevision.errors import CheckpointError
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.models.build import build_model
from cascadevision.presets import load_config
from cascadevision.tasks.detection import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.input.scale=[96,96]", "model.backbone.base_channels=8", "model.neck.out_channels=16",
        "model.rpn.feat_channels=16", "model.roi_head.box_head.fc_channels=32",
        "model.roi_head.mask_head.conv_channels=16", "model.roi_head.test.score_thr=0"]  # random weights score low
CLASSES, CAT_IDS = ["disc", "box", "wedge"], [3, 5, 9]  # ids that are not 1..3: the mapping must be the file's
MAX_UPLOAD_MB = 0.1
WIDTH, HEIGHT = 112, 80  # not square: a transposed mask would show


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_config("mask_rcnn_r18_fpn", TINY).model, num_classes=3, class_names=tuple(CLASSES))
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("serve") / "tiny.pth"
    return save_checkpoint(path, {"state_dict": model.state_dict(),
                                  "meta": {"config": {"model": to_dict(cfg)}, "class_names": CLASSES,
                                           "cat_ids": CAT_IDS}})


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(checkpoint):
    """The URL of `cascadevision serve` on a free port: batches of up to 4, a window long enough for concurrent
    requests to meet on a loaded machine, a 0.1 MiB upload limit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cascadevision.cli", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
         "--max-batch", "4", "--max-wait-ms", "300", "--max-upload-mb", str(MAX_UPLOAD_MB)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/", once the model is loaded
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        process.kill()
        pytest.fail(f"the server did not start: {line!r} {process.stderr.read()!r}")
    url = f"http://127.0.0.1:{found.group(1)}"
    for _ in range(100):  # uvicorn starts answering a moment after the line
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, device="cpu")[0]


def direct(model, data: bytes, score_thr: float) -> dict:
    """The model on the decoded image, masks pasted full size: the reference for the server's answer."""
    image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.inference_mode():
        prediction = model([image.float() / 255])[0]
    keep = prediction["scores"] >= score_thr
    return {k: prediction[k][keep] for k in ("boxes", "labels", "scores", "masks")}


def assert_same_detections(answer: dict, expected: dict, *, exact: bool = True) -> None:
    assert (answer["width"], answer["height"]) == (WIDTH, HEIGHT)
    detections = answer["detections"]
    assert len(detections) == len(expected["scores"]) > 0
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 0, "atol": 1e-4}
    scores = torch.tensor([d["score"] for d in detections])
    torch.testing.assert_close(scores, expected["scores"], **tolerance)
    x1, y1, x2, y2 = expected["boxes"].unbind(1)
    torch.testing.assert_close(torch.tensor([d["bbox"] for d in detections]),
                               torch.stack([x1, y1, x2 - x1, y2 - y1], 1), **tolerance)
    labels = expected["labels"].tolist()
    assert [d["category_id"] for d in detections] == [CAT_IDS[label] for label in labels]
    assert [d["category_name"] for d in detections] == [CLASSES[label] for label in labels]
    for detection, mask in zip(detections, expected["masks"]):
        assert detection["segmentation"]["size"] == [HEIGHT, WIDTH]
        decoded = torch.from_numpy(mask_util.decode(detection["segmentation"])).bool()
        differ = (decoded != mask).sum().item()
        assert differ == 0 if exact else differ <= 2, differ


def test_predict_answers_what_the_model_finds(server, model):
    health = httpx.get(server + "/healthz").json()
    assert health["ready"] is True and health["model"] == "mask_rcnn_r18_fpn" and health["device"] == "cpu"
    assert health["classes"] == [{"id": i, "name": n} for i, n in zip(CAT_IDS, CLASSES)]
    data = png(0)
    response = httpx.post(server + "/predict", params={"score_thr": 0.2}, files={"image": ("a.png", data)},
                          timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["score_thr"] == 0.2
    assert_same_detections(answer, direct(model, data, 0.2))
    default = httpx.post(server + "/predict", files={"image": ("a.png", data)}, timeout=60).json()
    assert default["score_thr"] == health["score_thr"] == 0.3  # config.PREDICT_SCORE_THR, what predict draws
    assert len(default["detections"]) == int((direct(model, data, 0.0)["scores"] >= 0.3).sum())
    overlay = httpx.post(server + "/overlay", params={"score_thr": 0.2}, files={"image": ("a.png", data)},
                         timeout=60)
    assert overlay.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB"))
    assert picture.shape == (HEIGHT, WIDTH, 3)
    assert (picture != np.asarray(Image.open(io.BytesIO(data)))).any(axis=2).mean() > 0.05  # something drawn


def test_requests_arriving_together_share_a_forward_and_get_their_own_answers(server, model):
    images = [png(seed) for seed in range(1, 5)]

    async def send_together():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(*[client.post("/predict", params={"score_thr": 0.2},
                                                      files={"image": (f"{i}.png", data)})
                                          for i, data in enumerate(images)])

    before = httpx.get(server + "/healthz").json()["stats"]
    responses = asyncio.run(send_together())
    after = httpx.get(server + "/healthz").json()["stats"]
    assert [r.status_code for r in responses] == [200] * 4
    assert after["requests"] - before["requests"] == 4
    assert after["forwards"] - before["forwards"] < 4  # some of them shared a forward pass
    assert after["largest_batch"] >= 2
    for response, data in zip(responses, images):  # a batched forward may round differently in the last bit
        assert_same_detections(response.json(), direct(model, data, 0.2), exact=False)


def test_bad_uploads_get_a_one_line_4xx_and_the_server_goes_on(server, model):
    def post(**kwargs) -> httpx.Response:
        return httpx.post(server + "/predict", timeout=60, **kwargs)

    data = png(0)
    big = os.urandom(int(MAX_UPLOAD_MB * 2**20) + 1000)

    def chunks():  # no Content-Length: refused once the bytes pass the limit
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    cases = {
        "text file": (post(files={"image": ("notes.txt", b"just some text\n")}), 415, "not an image"),
        "truncated png": (post(files={"image": ("cut.png", data[:len(data) // 2])}), 400, "cut.png"),
        "too large": (post(files={"image": ("big.png", big)}), 413, "too large"),
        "too large, chunked": (post(content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}),
                               413, "too large"),
        "wrong field": (post(files={"file": ("a.png", data)}), 422, "field 'image'"),
        "not multipart": (post(content=data, headers={"content-type": "image/png"}), 415, "multipart/form-data"),
        "bad threshold": (post(params={"score_thr": "high"}, files={"image": ("a.png", data)}), 422, "score_thr"),
    }
    for name, (response, status, says) in cases.items():
        assert response.status_code == status, (name, response.text)
        reason = response.json()["error"]
        assert says in reason and "\n" not in reason, (name, reason)
    assert httpx.get(server + "/healthz").json()["ready"] is True
    answer = post(params={"score_thr": 0.2}, files={"image": ("a.png", data)}).json()
    assert_same_detections(answer, direct(model, data, 0.2))


def test_start_up_errors_are_one_line_before_serving(tmp_path, capsys, checkpoint):
    assert main(["serve", str(tmp_path / "missing.pth"), "--port", "0"]) == 2
    assert main(["serve", str(tmp_path / "model.onnx"), "--port", "0"]) == 2
    assert main(["serve", str(checkpoint), "--max-batch", "-1"]) == 2
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["serve", str(checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert "missing.pth" in lines[0] and "model.onnx" in lines[1] and "max_batch" in lines[2]
    assert "already in use" in lines[3]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
MASK_ALPHA = 0.45  # the page's, as visualize.draw_predictions'


def class_color(label: int) -> tuple[int, int, int]:
    """visualize.class_color, written again: hues spread by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((0.1 + label * 0.618033988749895) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def test_the_page_draws_what_the_server_found(server, model, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the page is not tested")
    from playwright.sync_api import sync_playwright

    data = png(7)
    (tmp_path / "shapes.png").write_bytes(data)
    scores = direct(model, data, 0.0)["scores"]
    thr = round(float(scores[min(4, len(scores) - 1)]) - 1e-4, 6)  # about five instances
    expected = direct(model, data, thr)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800}, device_scale_factor=1)
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('thr').value !== ''")  # /healthz answered
            page.fill("#thr", str(thr))
            page.set_input_files("#file", str(tmp_path / "shapes.png"))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            page.screenshot(path=str(tmp_path / "page.png"))
            count = int(page.get_attribute("#count", "data-count"))
            shown = page.text_content("#count")
            tags = json.loads(page.get_attribute("#canvas", "data-tags"))  # to leave out of the comparison
            seen = np.asarray(Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB"))
            url = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")  # its exact pixels
        finally:
            browser.close()
    assert count == len(expected["scores"]) > 0 and shown == f"{count} instances"
    # the screenshot shows the canvas (at a sub-pixel offset: compared loosely), and the canvas holds the overlay
    assert abs(seen.shape[0] - HEIGHT - 2) <= 1 and abs(seen.shape[1] - WIDTH - 2) <= 1
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert drawn.shape == (HEIGHT, WIDTH, 3)
    assert abs(seen[1:1 + HEIGHT, 1:1 + WIDTH].astype(float).mean() - drawn.mean()) < 5
    drawn = drawn.astype(int)
    # the masks, blended as the page says (lowest score first), where no box outline or label tag is drawn
    picture = np.asarray(Image.open(io.BytesIO(data))).astype(float)
    covered = np.zeros((HEIGHT, WIDTH), bool)
    for index in expected["scores"].argsort().tolist():
        mask = expected["masks"][index].numpy()
        color = np.array(class_color(int(expected["labels"][index])), float)
        picture[mask] = np.round(picture[mask] * (1 - MASK_ALPHA) + color * MASK_ALPHA)
        covered |= mask
    clear = np.ones((HEIGHT, WIDTH), bool)  # not under a box outline or a label tag
    for x1, y1, x2, y2 in expected["boxes"].tolist():
        x1, y1, x2, y2 = (int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2)))
        for x in (x1, x2):
            clear[max(y1 - 2, 0):y2 + 3, max(x - 2, 0):x + 3] = False
        for y in (y1, y2):
            clear[max(y - 2, 0):y + 3, max(x1 - 2, 0):x2 + 3] = False
    assert 0 < len(tags) <= count
    for x1, y1, x2, y2 in tags:
        clear[max(int(y1) - 1, 0):int(np.ceil(y2)) + 2, max(int(x1) - 1, 0):int(np.ceil(x2)) + 2] = False
    assert (clear & covered).sum() >= 50, "too little of the masks is clear of boxes and tags to check"
    close = np.abs(drawn - picture).max(axis=2) <= 2
    assert close[clear & covered].mean() > 0.98, close[clear & covered].mean()  # the masks, where they are
    assert close[clear & ~covered].mean() > 0.98, close[clear & ~covered].mean()  # and nothing elsewhere


class ExportedStandIn:
    """What `cascadevision.export.runtime.load_exported` returns, as its contract says: the eval-mode model's
    call (full-size bool masks), `class_names`, `cat_ids`, `meta`. Here the tiny model stands in for the file."""

    def __init__(self, model):
        self.model = model
        self.class_names, self.cat_ids, self.meta = CLASSES, CAT_IDS, {"preset": "tiny_exported"}

    def __call__(self, images):
        return self.model(images)


def test_an_exported_file_is_served_through_the_export_runtime(tmp_path, monkeypatch, model):
    """Without a socket: the app on httpx's ASGI transport. `.onnx` files go to export.runtime.load_exported."""
    from cascadevision.serve import create_app, load_predictor

    onnx = tmp_path / "tiny.onnx"
    onnx.write_bytes(b"not read by the stand-in")
    monkeypatch.setitem(sys.modules, "cascadevision.export.runtime", None)  # as in an install without it
    if "cascadevision.export" not in sys.modules:
        monkeypatch.setitem(sys.modules, "cascadevision.export", types.ModuleType("cascadevision.export"))
    with pytest.raises(CheckpointError, match=r"tiny\.onnx: serving an exported model needs .*export\.runtime"):
        load_predictor(onnx, device="cpu")
    loaded = []
    runtime = types.ModuleType("cascadevision.export.runtime")
    runtime.load_exported = lambda path, device="cpu": loaded.append((Path(path), device)) or ExportedStandIn(model)
    monkeypatch.setitem(sys.modules, "cascadevision.export.runtime", runtime)
    predictor = load_predictor(onnx, device="cpu")
    assert loaded == [(onnx, "cpu")] and predictor.name == "tiny_exported"

    async def ask():
        transport = httpx.ASGITransport(app=create_app(predictor))
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return (await client.get("/healthz")).json(), (await client.post(
                "/predict", params={"score_thr": 0.2}, files={"image": ("a.png", png(0))})).json()

    health, answer = asyncio.run(ask())
    assert health["model"] == "tiny_exported" and [c["id"] for c in health["classes"]] == CAT_IDS
    assert health["max_batch"] == 1  # the default on the CPU, where stacking images was measured slower
    assert_same_detections(answer, direct(model, png(0), 0.2))


def test_the_server_answers_while_the_model_computes():
    """The model runs in its own thread: /healthz answers at once while a slow forward is under way."""
    from cascadevision.serve import Predictor, create_app

    started = []

    def slow_model(images):
        started.append(time.perf_counter())
        time.sleep(1.0)
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "masks": torch.zeros(0, *image.shape[1:], dtype=torch.bool)} for image in images]

    app = create_app(Predictor(slow_model, CLASSES, CAT_IDS, name="slow"))

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            slow = asyncio.create_task(client.post("/predict", files={"image": ("a.png", png(0))}))
            while not started:
                await asyncio.sleep(0.01)
            begin = time.perf_counter()
            health = await client.get("/healthz")
            waited = time.perf_counter() - begin
            return health, waited, await slow

    health, waited, answer = asyncio.run(ask())
    assert health.status_code == 200 and waited < 0.5, waited
    assert answer.status_code == 200 and answer.json()["detections"] == []
