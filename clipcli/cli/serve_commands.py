"""`clipcli serve`: thin over :mod:`clipcli.serve` (the app) and uvicorn (the HTTP server)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import ClipcliError, InputError
from .app import command
from .index_commands import DbOpt, IndexModelOpt, index_model
from .options import (
    MAX_PIXELS,
    ArchOpt,
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    ExactOpt,
    MaxPixelsOpt,
    PrecisionOpt,
    PrivateOpt,
    ThreadsOpt,
    TruncatedOpt,
    WorkersOpt,
    run_options,
)
from .render import hinted, say


def _default_db(db: Optional[str]) -> Optional[str]:
    """``--db`` (or $CLIPCLI_INDEX) as given; else the default index if there is one."""
    from ..index import default_path

    if db:
        return db
    found = default_path()
    return str(found) if found.is_file() else None


@command("serve")
def serve(
    db: DbOpt = None,
    model: IndexModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but a loopback address "
                                                     "needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8765,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="CLIPCLI_TOKEN", show_envvar=True, show_default=False,
        help="Require this token on every request (Authorization: Bearer TOKEN, or open the page as "
             "/?token=TOKEN). With a non-loopback --host and no token, one is made and printed once.")] = None,
    cors: Annotated[list[str], typer.Option("--cors", metavar="ORIGIN",
                                            help="Let pages from ORIGIN call the API (repeatable; off by default).")] = [],
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body.")] = 64,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Most images in one request.")] = 64,
    window_ms: Annotated[float, typer.Option("--batch-window-ms", min=0, max=1000,
                                             help="How long the model waits for more requests to batch with.")] = 4,
    arch: ArchOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log lines on stderr.")] = False,
    max_pixels: MaxPixelsOpt = MAX_PIXELS,
    allow_truncated: TruncatedOpt = False,
    allow_private: PrivateOpt = False,
    exact_decode: ExactOpt = False,
) -> None:
    """Keep a model warm and answer over HTTP: a search page at / and a JSON API
    (/health, /api/embed, /api/classify, /api/search) giving the commands' own records.

    The model loads once, after the server listens (/health says "loading" until then).
    Requests that arrive together are batched into one model call. Only files the index
    holds are shown, by id. It listens on 127.0.0.1 unless --host says otherwise, and then
    only with a token. SIGTERM or Ctrl-C: requests under way finish, then it exits.

    Example: clipcli serve --db photos.sqlite3   (then open http://127.0.0.1:8765/)

    Example: curl -s 'http://127.0.0.1:8765/api/search?q=a+red+bicycle&k=5'
    """
    import secrets
    import sys

    try:
        from ..serve.app import Limits, create_app
        from ..serve.guard import is_loopback
        from ..serve.server import Server, log_requests
        from ..serve.service import Service, Settings
    except ImportError as error:
        raise ClipcliError(f"clipcli serve needs its extra ({error.name} is missing): "
                           "pip install 'clipcli[serve]'") from None
    from ..index import Index

    db = _default_db(db)
    if db is not None:  # the model the index holds vectors of, found before anything loads
        with Index(db, readonly=True) as opened:
            model = index_model(opened, model)
    elif not model:
        from .options import DEFAULT_MODEL

        model = DEFAULT_MODEL
    loopback = is_loopback(host)
    made_token = not loopback and not token
    if made_token:
        token = secrets.token_urlsafe(24)
    if token is not None and not token.strip():
        raise InputError("is empty: give a token, or leave --token out on 127.0.0.1", option="token")
    run = run_options(batch_size, workers, max_pixels, allow_truncated, allow_private, exact_decode)
    service = Service(Settings(model, db=db, run=run, window=window_ms / 1000, load=dict(
        device=device, precision=precision, threads=threads, arch=arch, cache_dir=cache_dir,
        towers=("image", "text"))))
    limits = Limits(max_body=int(max_upload_mb * (1 << 20)), max_images=max_images)
    server = Server(service, create_app(service, token=token, loopback_only=loopback, limits=limits,
                                        cors=tuple(cors)), host, port)
    log_requests(sys.stderr, quiet)
    say(f"clipcli serve: listening on {server.url}" + (" (token required)" if token else "") + f"; loading {model}")
    if made_token:
        say(f"clipcli serve: the token (shown once): {token}; open {server.url}?token={token}")

    def loaded(done: Service) -> None:
        if done.status == "ok":
            from ..precision import slow_precision_note

            for note in filter(None, [*done.loaded.notes, slow_precision_note(done.loaded.device, done.loaded.dtype)]):
                say(f"note: {hinted(note)}")
            say(f"clipcli serve: {model} is ready")

    server.run(on_loaded=loaded)
