"""The HTTP server: `create_app(predictor, config)` is a FastAPI app (test it with any ASGI client, or run it with
uvicorn; `serve.server.run_server` does both the loading and the running).

    POST /predict?score_thr=0.3   multipart upload, field `image` -> COCO-style JSON (below)
    POST /overlay?score_thr=0.3   the same upload -> a PNG of the detections drawn (`visualize.draw_predictions`)
    GET  /healthz                 model name, classes, device, ready, batching counters
    GET  /                        a page to drop an image on: the overlay drawn from the JSON, and the JSON

/predict answers {"width", "height", "model", "score_thr", "detections": [...]} where each detection is a COCO
result (`engine.evaluator.results_to_coco`: `bbox` [x, y, w, h] in pixels, `category_id`, `score`,
`segmentation` as compressed RLE with str `counts`) plus `category_name` and the model's `label`. Every refusal
is a 4xx whose JSON body is {"error": one line}: a body over `max_upload_bytes` (refused from its Content-Length,
or as soon as it grows past it), no `image` field, a file that is not an image, an image over `max_pixels`
(from its header), a truncated or corrupt image.
"""
from __future__ import annotations

import io
from contextlib import asynccontextmanager
from importlib import resources

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..config import SERVE_AUTO_BATCH, ServeConfig, validate
from ..data.image import _one_line, exif_transpose, to_rgb_tensor
from ..engine.evaluator import results_to_coco
from ..errors import DatasetError
from ..visualize import draw_predictions
from .batching import Batcher
from .predictor import Predictor

FIELD = "image"  # the multipart field /predict reads
_PER_DETECTION = ("boxes", "labels", "scores", "masks", "mask_probs")  # the prediction keys indexed by detection


class UploadRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    validate(config, "serve.")
    max_batch = config.max_batch or SERVE_AUTO_BATCH.get(predictor.device.type, 1)
    batcher = Batcher(predictor, max_batch=max_batch, max_wait_s=config.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="cascadevision", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)

    @app.exception_handler(UploadRefused)
    async def refused(request: Request, exc: UploadRefused):
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):  # the model failed (out of memory, ...): logged by uvicorn
        return JSONResponse({"error": f"the server failed on this request: {type(exc).__name__}: {_one_line(exc)}"},
                            status_code=500)

    html = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")  # self-contained: no CDN

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ready": True, "model": predictor.name, "device": str(predictor.device),
                "classes": [{"id": i, "name": n} for i, n in zip(predictor.cat_ids, predictor.class_names)],
                "score_thr": config.score_thr, "max_batch": max_batch, "max_wait_ms": config.max_wait_ms,
                "max_upload_bytes": config.max_upload_bytes, "stats": batcher.stats()}

    async def predicted(request: Request, score_thr: float) -> tuple[torch.Tensor, dict]:
        image = await _uploaded_image(request, config.max_pixels)
        prediction = await batcher.predict(image)
        return image, keep_scoring(prediction, score_thr)

    thr = Query(None, ge=0.0, le=1.0, description="keep the detections scoring at least this")

    @app.post("/predict")
    async def predict(request: Request, score_thr: float | None = thr) -> dict:
        score_thr = config.score_thr if score_thr is None else score_thr
        image, prediction = await predicted(request, score_thr)
        detections = await run_in_threadpool(coco_detections, prediction, predictor)  # pastes and encodes masks
        return {"width": int(image.shape[2]), "height": int(image.shape[1]), "model": predictor.name,
                "score_thr": score_thr, "detections": detections}

    @app.post("/overlay")
    async def overlay(request: Request, score_thr: float | None = thr) -> Response:
        score_thr = config.score_thr if score_thr is None else score_thr
        image, prediction = await predicted(request, score_thr)
        png = await run_in_threadpool(_overlay_png, image, prediction, predictor.class_names, score_thr)
        return Response(png, media_type="image/png")

    return app


def keep_scoring(prediction: dict, score_thr: float) -> dict:
    """The detections of `prediction` scoring at least `score_thr` (the other keys as they are)."""
    keep = prediction["scores"] >= score_thr
    return {k: v[keep] if k in _PER_DETECTION else v for k, v in prediction.items()}


def coco_detections(prediction: dict, predictor: Predictor) -> list[dict]:
    """One image's prediction as COCO results (see `results_to_coco`) with `category_name` and `label` added."""
    results = results_to_coco([prediction], [0], predictor.cat_ids)
    for result, label in zip(results, prediction["labels"].tolist(), strict=True):
        del result["image_id"]
        result["category_name"] = predictor.class_names[label]
        result["label"] = label
    return results


def decode_image(data: bytes, max_pixels: int, name: str = "upload") -> torch.Tensor:
    """Uploaded bytes -> uint8 (3, H, W) RGB with the EXIF orientation applied, or `UploadRefused`: 415 for
    what is not an image, 413 for an image over `max_pixels` (read from the header, before decoding), 400 for
    one that cannot be decoded (truncated, corrupt)."""
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise UploadRefused(415, f"{name}: not an image file, or a format PIL cannot read") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header: PIL raises many kinds
        raise UploadRefused(400, f"{name}: cannot read the image header ({_one_line(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadRefused(413, f"{name}: {width}x{height} image is over the server's limit of {max_pixels} pixels")
    if width * height == 0:
        raise UploadRefused(400, f"{name}: the image is empty ({width}x{height})")
    try:
        image.load()
        return to_rgb_tensor(exif_transpose(image, name))
    except DatasetError as exc:
        raise UploadRefused(400, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt streams: OSError, SyntaxError, ValueError, ...
        raise UploadRefused(400, f"{name}: cannot decode the image ({_one_line(exc)})") from None


async def _uploaded_image(request: Request, max_pixels: int) -> torch.Tensor:
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise UploadRefused(415, f"send the image as multipart/form-data in the field '{FIELD}' "
                                 f"(got Content-Type {kind or 'none'})")
    try:
        form = await request.form()
    except BodyTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed multipart body
        raise UploadRefused(400, f"cannot parse the multipart body ({_one_line(exc)})") from None
    upload = form.get(FIELD)
    if not isinstance(upload, UploadFile):
        fields = ", ".join(sorted(form.keys())) or "none"
        raise UploadRefused(422, f"no file in the field '{FIELD}' (fields sent: {fields})")
    data = await upload.read()
    await form.close()
    return await run_in_threadpool(decode_image, data, max_pixels, upload.filename or FIELD)


def _overlay_png(image: torch.Tensor, prediction: dict, class_names: list[str], score_thr: float) -> bytes:
    buffer = io.BytesIO()
    draw_predictions(image, prediction, class_names, score_thr=score_thr).save(buffer, format="PNG")
    return buffer.getvalue()


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is read in full, from its
    Content-Length when it says one, else as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _refuse(send, self._reason(f"{int(declared)} bytes"))
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, self._reason(f"more than {self.max_bytes} bytes"))

    def _reason(self, size: str) -> str:
        return f"the upload is too large: {size}, the server takes at most {self.max_bytes} bytes"


async def _refuse(send, reason: str) -> None:
    body = JSONResponse({"error": reason}).body
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
