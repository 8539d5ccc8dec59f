"""`cxr serve`: the model behind an HTTP service (FastAPI on uvicorn) and a one-page front end.

    cxr serve [--variant NAME | --model FILE] [--host 127.0.0.1] [--port 8000] [--max-upload-mb N] [--site FILE]

Endpoints: `GET /` (the page: choose or drop an X-ray, see the label and why, P(pneumonia), the
refer band, the OOD level and the Grad-CAM overlay with its caption: cxr.serving.present's answer),
`POST /predict` (multipart field `file`: an image or DICOM; `?gradcam=true` adds the overlay as a
base64 PNG in `gradcam_png`, or `gradcam_error` saying why there is none, e.g. out of distribution),
`GET /health`, `GET /version`, `GET /openapi.json` and `GET /docs`.

Every upload goes through `cxr.serving.inference.predict_files` — the decoder and forward pass of
`cxr predict` — from a private temporary file deleted after the request, so the service's
answer is `cxr predict`'s. Bad requests get a 4xx and one-line `detail`, never a 5xx: no file
or an empty one 422, a body over the upload limit 413, anything the decoder refuses (not an
image, truncated, a decompression bomb, a DICOM without pixels) 415. Responses and log lines
carry the upload's file name and at most a DICOM's SOP Instance UID (the decoder's messages
keep to that, see cxr.data.dicom), never header values.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from cxr import __version__
from cxr.core.errors import CxrError
from cxr.core.provenance import sha256_file  # the one SHA-256 of a file (the export records the model's too)
from cxr.serving.inference import LoadedModel, load_model, predict_files
from cxr.serving.present import NOT_MEANINGFUL, answer, val_coverage

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_UPLOAD_MB = 64.0  # a 16-bit 4k x 4k DICOM is ~32 MB; chest X-ray JPEGs are ~0.1-2 MB
INTENDED_USE = "Research and teaching only — not for diagnostic use."
FIELD = "file"  # the multipart field of POST /predict
MAX_NAME = 200  # longer upload names are replaced (file systems allow 255 bytes)
PAGE = Path(__file__).parent / "templates" / "index.html.j2"

log = logging.getLogger("cxr.serving.serve")


@dataclass(frozen=True)
class ModelInfo:
    """What /version tells about the model; also in every /predict answer."""

    model: str  # the .keras file's stem
    model_sha256: str
    variant: str
    image_size: int
    threshold: float
    threshold_rule: str
    ood_gate: bool
    runtime: str  # keras | litert (the export, cxr.serving.runtime)
    threshold_source: str = "validation"  # or site:<file> with --site (cxr.serving.site)


def safe_name(filename: str | None) -> str:
    """The upload's base name as a file name in the private folder ("upload" when unusable).
    The suffix is kept: a `.dcm` name sends a file without the DICM marker to pydicom, as in `cxr predict`."""
    name = Path((filename or "").replace("\\", "/")).name.replace("\x00", "")
    if not name or name.startswith(".") or len(name.encode()) > MAX_NAME:
        suffix = Path(name).suffix if len(Path(name).suffix) <= 10 else ""
        return "upload" + re.sub(r"[^A-Za-z0-9.]", "", suffix)
    return name


class Service:
    """One loaded model, its Grad-CAM and a lock: TensorFlow calls run one at a time."""

    def __init__(self, loaded: LoadedModel, model_path: Path, max_upload_bytes: int):
        if max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
        self.loaded, self.max_upload_bytes = loaded, max_upload_bytes
        meta = loaded.meta
        self.info = ModelInfo(
            model=model_path.stem,
            model_sha256=sha256_file(model_path),
            variant=meta.variant,
            image_size=meta.image_size,
            threshold=loaded.threshold,  # a site file's when there is one
            threshold_rule=meta.threshold_rule if loaded.site is None else loaded.site.rule,
            ood_gate=loaded.gate is not None,
            runtime=loaded.runtime,
            threshold_source=loaded.threshold_source,
        )
        self.coverage = val_coverage(loaded)  # the refer band's validation coverage, in every answer
        self.lock = threading.Lock()
        self.workdir = Path(tempfile.mkdtemp(prefix="cxr-serve-"))  # mode 0700: uploads stay private
        self.cam, self.cam_error = self._gradcam()
        # compile the forward pass now, not in the first user's request
        loaded.outputs(np.zeros((1, meta.image_size, meta.image_size, 1), np.uint8))

    def _gradcam(self) -> tuple[Any, str | None]:
        from cxr.evaluation.gradcam import GradCam

        try:
            # with the LiteRT runtime the Keras model is loaded for Grad-CAM alone (its gradients)
            model = (
                self.loaded.model
                if self.loaded.model is not None
                else load_model(self.loaded.path, with_gate=False).model
            )
            return GradCam(model), None
        except (CxrError, ValueError) as exc:  # e.g. a model without convolutions
            return None, str(exc)

    def predict(self, data: io.BufferedIOBase, filename: str | None, gradcam: bool) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one upload: 200 with the prediction or a 4xx with `detail`."""
        from cxr.evaluation.gradcam import overlay

        name = safe_name(filename)
        folder = Path(tempfile.mkdtemp(dir=self.workdir))
        try:
            path = folder / name
            with open(path, "wb") as out:
                size = _copy_limited(data, out, self.max_upload_bytes)
            if size is None:
                return 413, {"detail": f"{name}: over the upload limit of {self.max_upload_bytes:,} bytes"}
            if size == 0:
                return 422, {
                    "detail": f"{name}: empty file; send an X-ray image or DICOM file in the multipart field '{FIELD}'"
                }
            images: dict[int, np.ndarray] = {}  # the decoded pixels, for Grad-CAM without a second decode
            with self.lock:
                (pred,) = predict_files(
                    [path], self.loaded, batch_size=1, on_image=images.__setitem__ if gradcam else None
                )
                body = answer(pred, self.coverage)
                # out of distribution: no overlay, it would be read as evidence on an image the model cannot judge
                wanted = gradcam and pred.ok and body["finding"]
                heat, cam_error = self._heatmap(images[0]) if wanted else (None, None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        body["path"] = name
        if not pred.ok:
            return 415, {"detail": body["error"].replace(str(folder) + "/", "")}
        if gradcam and not body["finding"]:
            cam_error = f"no Grad-CAM overlay: out of distribution, {NOT_MEANINGFUL}"
        if gradcam:
            body["gradcam_png"] = None if heat is None else png_base64(overlay(images[0], heat))
            body["gradcam_error"] = cam_error
        return 200, {**body, "model": self.info.model, "model_sha256": self.info.model_sha256}

    def _heatmap(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(Grad-CAM heatmap, None), or (None, why not): the prediction stands without it."""
        if self.cam is None:
            return None, f"Grad-CAM is not available for this model ({self.cam_error})"
        try:
            return self.cam(image), None
        except CxrError as exc:  # e.g. an output that does not depend on the feature map
            return None, str(exc)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _copy_limited(src: io.BufferedIOBase, dst: io.BufferedIOBase, limit: int) -> int | None:
    """Copy src to dst; the byte count, or None as soon as it passes `limit`."""
    total = 0
    for block in iter(lambda: src.read(1 << 20), b""):
        total += len(block)
        if total > limit:
            return None
        dst.write(block)
    return total


def png_base64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (plus FRAMING for the multipart
    headers) gets 413 before the app buffers it.

    A declared Content-Length is checked first; a chunked body is counted as it arrives. The
    rest of the body is read and dropped before answering (a client still sending would
    otherwise see a reset connection instead of the 413), at most `drain` more bytes.
    """

    FRAMING = 64 * 1024

    def __init__(self, app: Any, limit: int, drain: int):
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        most = self.limit + self.FRAMING
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > most:
            await self._discard(receive, 0)
            await JSONResponse({"detail": self.message()}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > most:
                    if message.get("more_body"):
                        await self._discard(receive, seen)
                    raise HTTPException(413, self.message())  # FastAPI turns it into the response
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return f"request body over the upload limit of {self.limit:,} bytes (cxr serve --max-upload-mb)"

    async def _discard(self, receive: Any, seen: int) -> None:
        while seen <= self.limit + self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return


def create_app(service: Service) -> Any:
    """The FastAPI app around one Service."""
    app = FastAPI(
        title="cxr",
        version=__version__,
        summary="P(pneumonia) for a pediatric chest X-ray. " + INTENDED_USE,
        description=__doc__.split("\n\n")[2],
    )
    app.add_middleware(BodyLimit, limit=service.max_upload_bytes, drain=4 * service.max_upload_bytes)
    env = Environment(loader=FileSystemLoader(PAGE.parent), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template(PAGE.name).render(
        info=service.info, intended_use=INTENDED_USE, field=FIELD, version=__version__
    )

    @app.get("/", response_class=HTMLResponse, summary="The page: choose or drop an X-ray")
    def index() -> str:
        return page

    @app.get("/health", summary="Liveness: the model is loaded")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version", summary="cxr's version and the model served")
    def version() -> dict[str, Any]:
        return {
            "cxr": __version__,
            **vars(service.info),
            "max_upload_bytes": service.max_upload_bytes,
            "intended_use": INTENDED_USE,
        }

    @app.post(
        "/predict",
        summary="P(pneumonia), the label at the model's threshold, and optionally the Grad-CAM overlay",
        responses={
            413: {"description": "upload too large"},
            415: {"description": "not a usable image"},
            422: {"description": "no file or an empty one"},
        },
    )
    def predict(
        file: UploadFile | None = File(None, description="an X-ray image (JPEG, PNG, ...) or a DICOM file"),  # noqa: B008 (FastAPI's idiom)
        gradcam: bool = Query(False, description="add the Grad-CAM overlay as a base64 PNG (gradcam_png)"),
    ) -> JSONResponse:
        started = time.perf_counter()
        if file is None:
            status, body = (
                422,
                {"detail": f"no file: send an X-ray image or DICOM file in the multipart field '{FIELD}'"},
            )
        else:
            status, body = service.predict(file.file, file.filename, gradcam)
        ms = 1000 * (time.perf_counter() - started)
        if status == 200:
            log.info("predict 200 %s p=%.4f %.0f ms", body["label"], body["probability"], ms)
        else:
            log.info("predict %d %s", status, body["detail"])
        return JSONResponse(body, status_code=status)

    return app


def serve(
    model_path: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    runtime: str = "auto",
    site: Path | None = None,
) -> None:
    """Load the model and serve it with uvicorn (one worker: one model, calls serialized) until interrupted."""
    import uvicorn

    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    loaded = load_model(model_path, runtime=runtime)
    if site is not None:
        from cxr.serving.site import apply_site

        loaded, _ = apply_site(loaded, site)
    service = Service(loaded, Path(model_path), int(max_upload_mb * 1024 * 1024))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    info = service.info
    log.info(
        "model %s (sha256 %s, %s), threshold %.4f (%s), OOD gate %s",
        info.model,
        info.model_sha256[:12],
        info.runtime,
        info.threshold,
        info.threshold_source,
        "yes" if info.ood_gate else "no",
    )
    log.info("page http://%s:%d/  API docs http://%s:%d/docs", host, port, host, port)
    try:
        uvicorn.run(create_app(service), host=host, port=port, workers=1)
    finally:
        service.close()
