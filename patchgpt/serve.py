"""`patchgpt serve CKPT`: a local web page to try a checkpoint — drop an image, pick or type a prompt, see the
answer, the task that gave it and its pictures.

Two endpoints over `Task.ask`: ``GET /api/info`` (the tasks the checkpoint holds and one example prompt per
task) and ``POST /api/ask`` (multipart: an ``image`` file and a ``prompt`` text), plus the page itself
(``page.html``: one self-contained file, nothing fetched from elsewhere). Every error is ``{"error": "one
line"}`` with a 4xx status (5xx for a bug). The model runs in a worker thread, one request at a time.
Starlette, uvicorn and python-multipart come with the ``serve`` extra: ``pip install 'patchgpt[serve]'``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import ipaddress
import math
import re
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .config import ConfigError
from .data.base import DataError
from .data.images import bomb_is_error, to_mode
from .tasks import load
from .tasks.prompts import menu, parts

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .tasks.base import Task

PAGE = Path(__file__).with_name("page.html")
OVERHEAD = 64 * 1024          # bytes of a multipart body beyond the image: part headers and the prompt
MAX_PROMPT = 2000             # characters
GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
HEADERS = {   # the page loads nothing from elsewhere; the browser is told so
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    """A request the server turns down: an HTTP status and a one-line message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def one_line(text: object, limit: int = 500) -> str:
    """`text` on one line (line breaks become spaces), cut to `limit` characters."""
    s = re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
    return s if len(s) <= limit else s[:limit - 1] + "…"


def megabytes(n: float) -> str:
    """Bytes as decimal megabytes for a message: ``12.3``, ``10``, ``0.001``."""
    mb = n / 1e6
    return f"{mb:.3g}" if mb < 10 else f"{mb:.1f}".removesuffix(".0")


def require_web() -> None:
    """A one-line `ConfigError` unless the ``serve`` extra (Starlette, uvicorn, python-multipart) is installed."""
    missing = [name for name, mods in (("starlette", ["starlette"]), ("uvicorn", ["uvicorn"]),
                                       ("python-multipart", ["python_multipart", "multipart"]))
               if not any(importlib.util.find_spec(m) for m in mods)]
    if missing:
        raise ConfigError(f"patchgpt serve needs {', '.join(missing)}: pip install 'patchgpt[serve]'")


# ---- the upload ------------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str) -> Image.Image:
    """The uploaded bytes as a Pillow image in L or RGB (palette, alpha, 16-bit, CMYK ... converted the way the
    data loaders convert them); `Refused` (400) for bytes Pillow cannot decode or a decompression bomb."""
    try:
        with bomb_is_error(), Image.open(io.BytesIO(data)) as im:
            im.load()
            gray = im.mode in GRAY_MODES or im.mode.startswith("I;16")
            return to_mode(im, 1 if gray else 3)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refused(400, f"{name}: refused as a possible decompression bomb (over Pillow's limit of "
                           f"{Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except DataError as e:                      # e.g. a float image with NaN pixels
        raise Refused(400, f"{name}: {e}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad bytes (OSError, SyntaxError, ...)
        raise Refused(400, f"not an image: {name}") from None


def too_large(size: int, limit: int, over: bool = False) -> Refused:
    """The 413 for an upload of `size` bytes against a `limit` in bytes."""
    return Refused(413, f"image is {'over ' if over else ''}{megabytes(size)} MB; the limit is {megabytes(limit)} MB")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to hold more than a `max_bytes` image: by its
    Content-Length before reading, else while it streams in."""
    limit = max_bytes + OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), max_bytes)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large(n, max_bytes, over=True)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, max_bytes: int) -> tuple[Image.Image | None, str, str]:
    """(image or None, prompt, the file's name) from a multipart ``image`` + ``prompt`` form."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as Req

    body = await read_body(request, max_bytes)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Req(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=OVERHEAD)
    except HTTPException as e:
        raise Refused(400, f"bad form: {e.detail}") from None
    prompt, upload = form.get("prompt") or "", form.get("image")
    if not isinstance(prompt, str):
        raise Refused(400, "prompt must be text, not a file")
    if len(prompt) > MAX_PROMPT:
        raise Refused(400, f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT}")
    if not isinstance(upload, UploadFile) or not (upload.filename or upload.size):
        return None, prompt, ""
    name = one_line(upload.filename or "upload", 120)
    data = await upload.read()
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    return decode_image(data, name), prompt, name


# ---- the answer ------------------------------------------------------------------------------------------------


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values, non-finite floats as None, text valid UTF-8."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, str):   # numpy scalars and arrays, torch tensors
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, str):
        return x.encode("utf-8", "replace").decode("utf-8")
    if x is None or isinstance(x, (bool, int)):
        return x
    return str(x)


def png_url(path: str | Path) -> str:
    """A PNG file as a ``data:`` URL."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def unplace(x: Any, image: str, tmp: str, name: str) -> Any:
    """`x` with the saved upload's path `image` as the upload's `name`, other paths in `tmp` as file names."""
    if isinstance(x, dict):
        return {k: unplace(v, image, tmp, name) for k, v in x.items()}
    if isinstance(x, list):
        return [unplace(v, image, tmp, name) for v in x]
    if isinstance(x, str) and x.startswith(tmp):
        return name if x == image else Path(x).name
    return x


def answer(task: Task, lock: threading.Lock, image: Image.Image | None, prompt: str, name: str) -> dict:
    """`task.ask` about `image` in a fresh temporary directory (removed after), one call at a time; the
    pictures it writes as data URLs.

    The image is saved apart from the pictures' folder: tasks name a picture after its input (detection's
    boxes), which must not land on the input's own name."""
    with lock, tempfile.TemporaryDirectory(prefix="patchgpt-serve-") as tmp:
        src = Path(tmp) / "upload" / "image.png"
        if image is not None:
            src.parent.mkdir()
            image.save(src, format="PNG")
        reply = task.ask(src if image is not None else None, prompt.strip() or None, out=Path(tmp) / "out")
        pictures = [png_url(p) for p in reply.get("pictures", [])]
        result = unplace(jsonable(reply.get("result", {})), str(src), tmp, name or "image.png")
    return {"task": reply["task"], "prompt": reply["prompt"], "answer": jsonable(reply["answer"]), "result": result,
            "pictures": pictures}


# ---- the app ---------------------------------------------------------------------------------------------------


def error(status: int, message: object) -> Response:
    """``{"error": "one line"}`` with `status`."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": one_line(message) or "error"}, status_code=status, headers=HEADERS)


def make_app(task_or_ckpt: Task | str | Path, max_bytes: int = 10_000_000, name: str | None = None) -> Starlette:
    """The web app over a loaded task (or a checkpoint path, loaded here): the page, ``/api/info`` and
    ``/api/ask``; uploads over `max_bytes` are refused (413). `name` labels the page (default: the
    checkpoint directory's name, or the task's)."""
    require_web()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    if isinstance(task_or_ckpt, (str, Path)):
        name = name or Path(task_or_ckpt).resolve().name
        task = load(task_or_ckpt)
    else:
        task = task_or_ckpt
    info = {"name": name or task.name, "tasks": list(parts(task)), "prompts": menu(task), "max_bytes": max_bytes}
    page, lock = PAGE.read_text(encoding="utf-8"), threading.Lock()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=HEADERS)

    async def api_info(request: Request) -> Response:
        return JSONResponse(info, headers=HEADERS)

    async def api_ask(request: Request) -> Response:
        try:
            image, prompt, filename = await read_form(request, max_bytes)
            reply = await run_in_threadpool(answer, task, lock, image, prompt, filename)
        except Refused as e:
            return error(e.status, e)
        except (ConfigError, DataError) as e:
            return error(400, e)
        except Exception as e:  # noqa: BLE001 - a bug: one line for the page, the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
            return error(500, f"internal error ({type(e).__name__}: {e})")
        return JSONResponse(reply, headers=HEADERS)

    async def http_error(request: Request, exc: Exception) -> Response:   # 404, 405: JSON like the rest
        status = getattr(exc, "status_code", 500)
        return error(status, f"{getattr(exc, 'detail', exc)}: {request.method} {request.url.path}")

    return Starlette(routes=[Route("/", index), Route("/api/info", api_info),
                             Route("/api/ask", api_ask, methods=["POST"])],
                     exception_handlers={HTTPException: http_error})


# ---- the server ------------------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (port 0: any free one); a one-line `ConfigError` if it cannot."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    """The page's address for a socket bound by `listen` (a wildcard address shown as this machine's)."""
    host, port = sock.getsockname()[:2]
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        host = "127.0.0.1" if ip.version == 4 else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, max_bytes: int = 10_000_000) -> None:
    """Load `ckpt` once, print one line with the page's address (the real port when `port` is 0) and serve
    the page until Ctrl+C. Binds to this machine only unless `host` says otherwise (no login: anyone who can
    reach the address can use the model)."""
    require_web()
    import uvicorn

    task = load(ckpt)
    app = make_app(task, max_bytes=max_bytes, name=Path(ckpt).resolve().name)
    sock = listen(host, port)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        print(f"patchgpt: warning: --host {host}: the page is open to anyone who can reach this address",
              file=sys.stderr)
    print(f"patchgpt: serving {Path(ckpt)} ({', '.join(parts(task))}) at {url(sock)} (Ctrl+C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["make_app", "serve"]
