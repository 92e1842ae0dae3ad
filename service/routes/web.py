"""The web page: `GET /` serves a static page (HTML, CSS, JavaScript in `service/static/`, shipped as package
data) that draws digits and calls the public API; `/static/...` serves its files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from service.settings import Settings

STATIC_DIR = Path(__file__).parents[1] / "static"
# The page loads nothing from elsewhere: no CDN, no inline script.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


def add_routes(r: APIRouter, settings: Settings) -> None:
    # Starlette's StaticFiles behind a route rather than a mount: the metrics then label these requests
    # with the route's template.
    files = StaticFiles(directory=STATIC_DIR)

    @r.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    @r.api_route("/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(path: str, request: Request) -> Response:
        return await files.get_response(path, request.scope)
