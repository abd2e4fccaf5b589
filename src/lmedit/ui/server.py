"""The page's HTTP side (Starlette): the page itself, served from the package, and a small JSON API over a Session.

Nothing is fetched from outside: the page is three files in static/, and its Content-Security-Policy lets the
browser load nothing from anywhere else. The server binds to loopback unless told otherwise. A request that
changes anything must carry the `X-Lmedit: 1` header, which a page of another site cannot send without a CORS
preflight this server never grants; bound to loopback, it also answers only to a loopback Host (no DNS
rebinding). Every error is JSON, {"errors": {field: message}}, one line each: never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import traceback
from importlib.resources import files
from urllib.parse import unquote, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmedit.errors import InputError, LmeditError
from lmedit.ui.forms import FieldError, field_of
from lmedit.ui.session import Session

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}
MAX_UPLOAD_BYTES = 4 << 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the Host check (when serving loopback only) and the header every change must carry."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            problem = None
            if self.loopback_only and not is_loopback(host):
                problem = f"this server answers only on loopback, not to Host {headers.get('host', '')!r}"
            elif scope["method"] not in ("GET", "HEAD") and headers.get("x-lmedit") != "1":
                problem = "a request that changes the model must come from the lmedit page (header X-Lmedit: 1)"
            if problem:
                await JSONResponse({"errors": {"form": problem}}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _errors(field: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"errors": {field: message}}, status)


def api(handler):
    """Wrap an endpoint so every error is one JSON line for the page (traceback only in the server's log)."""

    async def endpoint(request: Request):
        try:
            return await handler(request)
        except FieldError as e:
            return _errors(e.field, str(e), 400)
        except InputError as e:
            return _errors(field_of(e), str(e), 400)
        except LmeditError as e:
            return _errors("form", str(e), 500)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the page gets one line
            traceback.print_exc()
            return _errors("form", f"internal error: {type(e).__name__} (details in the server's log)", 500)

    return endpoint


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InputError("the request body is not JSON") from None


def _entry_id(request: Request) -> int:
    try:
        return int(request.path_params["entry"])
    except ValueError:
        raise InputError(f"not a patch id: {request.path_params['entry']!r}") from None


def create_app(session: Session, loopback_only: bool = False):
    """The ASGI app over `session`. `loopback_only` refuses any Host but loopback (what `lmedit ui` serves with
    unless --host is given); tests talk to the app directly with the Host their client sends."""

    def page(path: str):
        name, kind = STATIC[path]
        body = (files("lmedit.ui") / "static" / name).read_bytes()

        async def endpoint(request: Request):
            return Response(body, media_type=kind, headers=PAGE_HEADERS)

        return endpoint

    async def info(request):
        return JSONResponse(await run_in_threadpool(session.info))

    async def edit(request):
        job = await run_in_threadpool(session.submit, await _json(request))
        return JSONResponse({"job": job.id, "position": session.jobs.position(job)}, 202)

    async def job(request):
        try:
            job_id = int(request.path_params["job"])
        except ValueError:
            raise InputError(f"not a job id: {request.path_params['job']!r}") from None
        jobs = session.jobs
        return JSONResponse(jobs.status(jobs.get(job_id)))

    async def probe(request):
        return JSONResponse({"rows": await run_in_threadpool(session.probe, await _json(request))})

    async def stack(request):
        return JSONResponse({"stack": await run_in_threadpool(session.stack_state)})

    async def revert(request):
        return JSONResponse({"stack": await run_in_threadpool(session.revert, _entry_id(request))})

    async def download(request):
        name, data = await run_in_threadpool(session.archive, _entry_id(request))
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def upload(request):
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                raise FieldError("upload", f"the upload is larger than {MAX_UPLOAD_BYTES >> 30} GiB")
        name = unquote(request.headers.get("x-filename") or "") or "upload"
        return JSONResponse({"stack": await run_in_threadpool(session.load, bytes(data), name)})

    routes = [Route(path, page(path), methods=["GET"]) for path in STATIC] + [
        Route("/api/info", api(info), methods=["GET"]),
        Route("/api/edit", api(edit), methods=["POST"]),
        Route("/api/jobs/{job}", api(job), methods=["GET"]),
        Route("/api/probe", api(probe), methods=["POST"]),
        Route("/api/patches", api(stack), methods=["GET"]),
        Route("/api/patches", api(upload), methods=["POST"]),
        Route("/api/patches/{entry}/revert", api(revert), methods=["POST"]),
        Route("/api/patches/{entry}/archive", api(download), methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return Guard(app, loopback_only)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), bound before the model loads, so a busy port is a
    one-line error at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock


def serve(session: Session, sock: socket.socket, loopback_only: bool) -> None:
    """Serve until Ctrl-C (uvicorn, quiet: no access log, no server header)."""
    import uvicorn

    config = uvicorn.Config(create_app(session, loopback_only), log_level="warning", access_log=False,
                            lifespan="off", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
