"""The FastAPI application of `reslab serve`: the page, its static files and the JSON API.

Every error is JSON ``{"error": "..."}`` with a 4xx status, and no error stops the server:
an upload that is not an image (415), one over :data:`MAX_UPLOAD` bytes (413), a request
without a file (400), an unknown route (404), a wrong method (405).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from reslab.errors import ReslabError
from reslab.serve.batching import MicroBatcher
from reslab.serve.models import Upload

MAX_UPLOAD = 20 * 1024 * 1024  # bytes: a large phone photo, with room to spare
STATIC = resources.files("reslab.serve") / "static"
PICTURES = ("curves", "confusion")  # the PNGs a training run writes into its folder


def run_info(service, run_dir: Path | None) -> dict:
    """What the page shows beside a prediction: the model, its classes, config and pictures."""
    payload = service.payload
    classes = payload.get("classes") or payload.get("class_names") or []
    pictures = [n for n in PICTURES if run_dir is not None and (run_dir / f"{n}.png").is_file()]
    return {
        "task": service.task,
        "model": payload["model"]["name"],
        "model_kwargs": payload["model"].get("kwargs", {}),
        "classes": list(classes),
        # a classifier's run config, or a detector's training config
        "config": payload.get("config") or payload.get("train_config") or {},
        "epoch": payload.get("epoch"),
        "explain": service.explains,
        "pictures": pictures,
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD:
            raise HTTPException(413, f"the upload is over the limit of {MAX_UPLOAD:,} bytes")
    return bytes(body)


async def read_upload(request: Request) -> tuple[bytes, str]:
    """(bytes, file name) of the image: the form field ``file`` (multipart, as the page and
    ``curl -F file=@x.png`` send it), or the whole body (``curl --data-binary @x.png``)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD:
        raise HTTPException(413, f"the upload is over the limit of {MAX_UPLOAD:,} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _read_body(request), "the upload"
    form = await request.form(max_files=1)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "send the image as the multipart form field 'file'")
    data = await upload.read()
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"the upload is over the limit of {MAX_UPLOAD:,} bytes")
    return data, upload.filename or "the upload"


routes = APIRouter()


@routes.get("/", include_in_schema=False)
async def page():
    return FileResponse(str(STATIC / "index.html"))


@routes.get("/health")
async def health(request: Request):
    info = request.app.state.info
    return {"status": "ok", "task": info["task"], "model": info["model"]}


@routes.get("/run")
async def run(request: Request):
    return request.app.state.info


@routes.get("/run/{name}.png")
async def picture(request: Request, name: str):
    if name not in request.app.state.info["pictures"]:
        raise HTTPException(404, f"this run has no {name}.png")
    return FileResponse(str(request.app.state.run_dir / f"{name}.png"))


@routes.get("/stats")
async def stats(request: Request):
    """Requests, batches and the seconds spent in each stage since the server started."""
    return request.app.state.batcher.stats.to_dict()


@routes.post("/predict")
async def predict(request: Request, top: int = 5):
    if top < 1:
        raise HTTPException(422, f"top must be >= 1, got {top}")
    started = time.perf_counter()
    data, name = await read_upload(request)
    batcher = request.app.state.batcher
    batcher.stats.spent("upload", time.perf_counter() - started)  # the body and the form
    if not data:
        raise HTTPException(400, "the upload is empty; send an image file")
    try:
        return await batcher.submit(Upload(data, name, top))
    except ReslabError as error:
        return _error(415, str(error))


@routes.post("/explain")
async def explain(request: Request, target: str | None = None, layer: str | None = None):
    """The upload with the Grad-CAM map of ``target`` (default: the predicted class) of
    ``layer`` (default: the last stage) over it, as a PNG."""
    service = request.app.state.service
    if not service.explains:
        raise HTTPException(404, f"Grad-CAM explains classifiers; this model is a {service.task}")
    try:
        service.check_explain(target, layer)
    except ReslabError as error:
        return _error(422, str(error))
    data, name = await read_upload(request)
    if not data:
        raise HTTPException(400, "the upload is empty; send an image file")
    try:
        png = await run_in_threadpool(service.explain, Upload(data, name), target, layer)
    except ReslabError as error:
        return _error(415, str(error))
    return Response(png, media_type="image/png")


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    return _error(error.status_code, str(error.detail))


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    return _error(422, "; ".join(e.get("msg", "") for e in error.errors()))


def create_app(service, run_dir: Path | None, max_batch: int = 32, max_wait: float = 0.002):
    """The application serving ``service`` (:mod:`reslab.serve.models`), its requests batched
    by up to ``max_batch`` within ``max_wait`` seconds; ``run_dir`` holds the run's pictures."""
    batcher = MicroBatcher(service.run, max_batch, max_wait)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="reslab serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service, app.state.batcher, app.state.run_dir = service, batcher, run_dir
    app.state.info = run_info(service, run_dir)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.include_router(routes)
    return app
