"""A cap on one path's request body, enforced before the body is parsed: multipart parsing would otherwise spool
an upload of any size to disk before the endpoint could look at it."""

from __future__ import annotations

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware: a request to ``path`` whose body is over ``max_bytes`` gets 413 with a JSON message.

    A declared Content-Length over the limit is answered before reading anything; a body without one (chunked) is
    counted as it arrives and the read that passes the limit raises the 413 inside the endpoint, where FastAPI
    turns it into the response.
    """

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int, what: str) -> None:
        self.app, self.path, self.max_bytes, self.what = app, path, max_bytes, what

    def message(self, size: str) -> str:
        return (f"request body of {size} bytes is over the limit of {self.max_bytes:,} bytes ({self.what}); "
                "send fewer or smaller photos")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.message(f"{int(declared):,}")}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message(f"more than {self.max_bytes:,}"))
            return message

        await self.app(scope, counted, send)
