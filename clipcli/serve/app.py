"""The HTTP face of :class:`~.service.Service`: a Starlette app with the JSON API and the page.

Routes (every answer is JSON but the page, its files and the images):

- ``GET /health``: ``{"status", "model", "score", "images"}``; 503 while the model loads.
- ``POST /api/embed``: JSON ``{"texts": [...]}`` or ``{"urls": [...]}``, or a multipart form of
  image files -> ``{"model", "embeddings": [[...] | null], ...}``, as ``clipcli encode``.
- ``POST /api/classify``: images (files or ``urls``) and ``labels`` (+ ``template``,
  ``templates``, ``top_k``, ``min_prob``) -> ``{"model", "results": [classify's records]}``.
- ``GET|POST /api/search``: ``q`` (repeatable, ``W:TERM`` weighs), ``minus``, ``in``, ``k``,
  ``offset``, ``threshold``, ``min_prob``; POST adds query images as ``image`` files ->
  ``{"results": [search's records], "ids": [file id per result], ...}``.
- ``GET /api/thumbnail/{id}``, ``GET /api/image/{id}``: an indexed file by id (:mod:`.files`).
- ``GET /``: the search page (``static/``).

A request's terms are text or http(s) URLs, never paths: nothing in a request names a file
on this machine (the files shown are named by id). Errors are the CLI's one-line messages
(:mod:`clipcli.messages`) as ``{"error", "option", "fix"}`` with an HTTP status: 400 bad
input, 401 no token, 404 nothing there, 413 too large, 503 loading or busy (Retry-After).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ClipcliError, ContextLengthError, IndexDatabaseError, InputError, NoVectorsError
from ..items import Item, url_item
from ..messages import error_text
from .batcher import Busy
from .files import NotServed, Thumbnails
from .guard import LOG, Guard, TooLarge
from .service import Loading, Service

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body: int = 64 << 20  # bytes of a request body (all its images together)
    max_images: int = 64
    max_texts: int = 1024
    max_text_chars: int = 10_000
    max_k: int = 1000
    max_labels: int = 1000
    max_prompts: int = 20_000  # labels x templates: each is a text the model embeds
    max_requests: int = 256  # under way at once (each may hold a body of max_body in memory)


class JSON(JSONResponse):
    """JSON in ASCII: a lone surrogate from a request (``"\\ud800"`` in its JSON) is escaped,
    never a failure to encode the answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, message: str, option: str | None = None, headers: dict | None = None) -> JSON:
    body: dict[str, Any] = {"error": message}  # the message says the fix, as the CLI's line does
    if option:
        body["option"] = option
    return JSON(body, status_code=status, headers=headers)


def _library_error(request: Request, error: ClipcliError) -> JSON:
    if isinstance(error, Loading):
        return _error(503, str(error), headers={"Retry-After": "2"})
    if isinstance(error, (NoVectorsError, NotServed)):
        status = 404
    elif isinstance(error, IndexDatabaseError):  # damaged, locked, unreadable: not the request's fault
        status = 503
    else:
        status = 400 if isinstance(error, (InputError, ContextLengthError)) or error.exit_code == 2 else 500
    return _error(status, error_text(error), error.option)


def _unexpected(request: Request, error: Exception) -> JSON:
    if isinstance(error, TooLarge):
        return _error(413, "the request body is larger than this server takes (--max-upload-mb)")
    LOG.error("%s %s failed", request.method, request.url.path, exc_info=error)  # the traceback: in the log only
    return _error(500, f"internal error ({type(error).__name__}); the server's log says more")


def _http_error(request: Request, error: HTTPException) -> JSON:
    return _error(error.status_code, str(error.detail), headers=getattr(error, "headers", None))


def _busy(request: Request, error: Busy) -> JSON:
    return _error(503, f"busy: {error}; try again shortly", headers={"Retry-After": "1"})


# --------------------------------------------------------------------------- reading requests

class Form:
    """A request's fields, from its query string, its JSON body or its multipart form, and
    the image files it carries, checked against :class:`Limits`."""

    def __init__(self, fields: dict[str, list], files: list[Item], limits: Limits):
        self.fields, self.files, self.limits = fields, files, limits

    @classmethod
    async def read(cls, request: Request, limits: Limits) -> "Form":
        fields: dict[str, list] = {}
        for key, value in request.query_params.multi_items():
            fields.setdefault(key, []).append(value)
        files: list[Item] = []
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind == "application/json":
            try:  # off the event loop: a body may be tens of megabytes
                body = await run_in_threadpool(json.loads, await request.body())
            except (ValueError, UnicodeDecodeError, RecursionError) as error:
                raise InputError(f"the body is not JSON: {str(error)[:200]}") from None
            if not isinstance(body, dict):
                raise InputError("the JSON body must be an object")
            for key, value in body.items():
                fields[key] = value if isinstance(value, list) else [value]
        elif request.method == "POST" and kind == "multipart/form-data":
            async with request.form(max_files=limits.max_images, max_fields=4 * limits.max_texts) as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        files.append(Item(name=value.filename or f"upload-{len(files) + 1}", data=data))
                    else:
                        fields.setdefault(key, []).append(value)
        elif request.method == "POST" and kind:
            raise InputError(f"send JSON or a multipart form, not {kind[:60]}")
        return cls(fields, files, limits)

    def strings(self, key: str, most: int | None = None) -> list[str]:
        values = self.fields.get(key, [])
        if any(not isinstance(v, str) for v in values):
            raise InputError(f"{key} must be text (a string or a list of strings)")
        for value in values:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): not text
                raise InputError(f"a value of {key} is not valid Unicode text") from None
        most = most or self.limits.max_texts
        if len(values) > most:
            raise InputError(f"{len(values)} values of {key}: at most {most} in one request")
        for value in values:
            if len(value) > self.limits.max_text_chars:
                raise InputError(f"a value of {key} has {len(value)} characters; at most "
                                 f"{self.limits.max_text_chars}")
        return values

    def one(self, key: str) -> str | None:
        values = self.fields.get(key, [])
        if len(values) > 1:
            raise InputError(f"{key} is given {len(values)} times")
        if not values or values[0] is None:
            return None
        if isinstance(values[0], (dict, list)):
            raise InputError(f"{key} must be a single value")
        return self.strings(key)[0] if isinstance(values[0], str) else str(values[0])

    def number(self, key: str, default: float | None, *, integer: bool = False, low: float | None = None,
               high: float | None = None) -> Any:
        text = self.one(key)
        if text is None or text == "":
            return default
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise InputError(f"{key}={text[:40]}: give {'a whole number' if integer else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise InputError(f"{key}={text[:40]}: give a number {bounds}")
        return value

    def when(self, key: str) -> float | None:
        """A date or date and time (:func:`clipcli.metadata.parse_when`) as Unix seconds."""
        from ..metadata import parse_when

        text = self.one(key)
        return parse_when(text, option=key) if text else None

    def flag(self, key: str, default: bool) -> bool:
        text = self.one(key)
        if text is None:
            return default
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"{key}={text[:40]}: give true or false")

    def images(self) -> list[Item]:
        """Uploaded files, then ``urls`` (fetched through the CLI's guard: public addresses only,
        unless the server allows private ones)."""
        urls = self.strings("urls", self.limits.max_images)
        for url in urls:
            if not url.lower().startswith(("http://", "https://")):
                raise InputError(f"{url[:80]!r}: only http(s) URLs are fetched (upload a file instead)")
        items = [*self.files, *(url_item(url) for url in urls)]
        if len(items) > self.limits.max_images:
            raise InputError(f"{len(items)} images: at most {self.limits.max_images} in one request")
        return items


def _embedding(result) -> list[float] | None:
    import numpy as np

    return result.embedding.astype(np.float64).tolist() if result.ok else None


# --------------------------------------------------------------------------- the app

def create_app(service: Service, *, token: str | None = None, loopback_only: bool = True,
               limits: Limits = Limits(), cors: tuple[str, ...] = (), thumbnails: Thumbnails | None = None):
    """The ASGI app for ``service`` (loaded on startup unless it was started already)."""
    thumbs = thumbnails or Thumbnails(service.settings.run.decode)

    async def health(request: Request) -> Response:
        body = await run_in_threadpool(service.health)
        return JSON(body, status_code=200 if body["status"] == "ok" else 503,
                            headers=None if body["status"] == "ok" else {"Retry-After": "2"})

    async def embed(request: Request) -> Response:
        form = await Form.read(request, limits)
        texts, images = form.strings("texts"), form.images()
        if bool(texts) == bool(images):
            raise InputError("give either texts or images (uploaded files or urls), not both, not neither")
        normalize = form.flag("normalize", True)
        if texts:
            results = await service.embed_texts(texts, normalize=normalize, truncate=form.flag("truncate", True))
        else:
            results = await service.embed_images(images, normalize=normalize)
        body: dict[str, Any] = {"model": service.settings.model, "embeddings": [_embedding(r) for r in results]}
        if any(getattr(r, "truncated", False) for r in results):
            body["truncated"] = [bool(r.truncated) for r in results]
        errors = [{"index": i, "input": r.name, "error": str(r.error)} for i, r in enumerate(results) if not r.ok]
        if errors:
            body["errors"] = errors
        return JSON(body)

    async def classify(request: Request) -> Response:
        from ..zeroshot import TEMPLATE_SETS, choose_templates, parse_labels

        form = await Form.read(request, limits)
        images = form.images()
        if not images:
            raise InputError("give images to classify: uploaded files or urls")
        labels = parse_labels(form.strings("labels", limits.max_labels))
        if not labels:
            raise InputError("no labels: give labels=cat,dog")
        named = form.one("templates")
        if named is not None and named not in TEMPLATE_SETS:  # a file name would read this machine's files
            raise InputError(f"templates={named[:40]}: choose {' or '.join(TEMPLATE_SETS)}")
        templates = choose_templates(form.strings("template", 100), named, "template")
        if len(labels) > limits.max_labels or len(labels) * len(templates) > limits.max_prompts:
            raise InputError(f"{len(labels)} labels in {len(templates)} templates: at most {limits.max_labels} "
                             f"labels and {limits.max_prompts} prompts (labels x templates) in one request")
        records = await service.classify(images, labels, templates, top_k=form.number("top_k", 5, integer=True, low=1),
                                         min_prob=form.number("min_prob", None))
        return JSON({"model": service.settings.model, "results": records})

    async def search(request: Request) -> Response:
        from ..search import Term, parse_terms, score_kind

        form = await Form.read(request, limits)
        queries, minus = form.strings("q", 64), form.strings("minus", 64)
        terms = parse_terms(queries, minus, paths=False) if (queries or minus) or not form.files else []
        weight = form.number("image_weight", 1.0)
        terms += [Term(item.name, weight, "image", item.data) for item in form.files]
        top_k = form.number("k", 10, integer=True, low=1, high=limits.max_k)
        offset = form.number("offset", 0, integer=True, low=0, high=100 * limits.max_k)
        results, ids = await service.search(
            terms, top_k=top_k, offset=offset, threshold=form.number("threshold", None),
            min_prob=form.number("min_prob", None), under=form.strings("in", 64), after=form.when("after"),
            before=form.when("before"), sort=form.one("sort") or "score")
        return JSON({"results": results, "ids": ids, "model": service.settings.model,
                             "score_kind": score_kind(service.loaded.model), "offset": offset, "k": top_k})

    async def thumbnail(request: Request) -> Response:
        path = await run_in_threadpool(service.indexed_file, request.path_params["id"])
        data = await run_in_threadpool(thumbs.thumbnail, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def image(request: Request) -> Response:
        path = await run_in_threadpool(service.indexed_file, request.path_params["id"])
        data, media_type = await run_in_threadpool(thumbs.full, path)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not service.started:
            service.start()
        yield
        await run_in_threadpool(service.stop)

    routes = [
        Route("/", page), Route("/health", health),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/classify", classify, methods=["POST"]),
        Route("/api/search", search, methods=["GET", "POST"]),
        Route("/api/thumbnail/{id}", thumbnail), Route("/api/image/{id}", image),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {ClipcliError: _library_error, Busy: _busy, HTTPException: _http_error, Exception: _unexpected}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    guarded = Guard(app, token=token, max_body=limits.max_body, loopback_only=loopback_only, origins=cors,
                    max_requests=limits.max_requests)
    if not cors:
        return guarded
    from starlette.middleware.cors import CORSMiddleware

    # Outside the guard: a preflight carries no token, and a 401 needs CORS headers to be read.
    return CORSMiddleware(guarded, allow_origins=list(cors), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"])
