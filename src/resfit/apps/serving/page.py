"""The page at ``/``: drop images, see the service's answers and Grad-CAM overlays.

One HTML file with its CSS and a little vanilla JavaScript (``page.html``, a package resource):
no CDN, no build step, so it works offline and behind any proxy. It calls the same
``/v1/predict`` and ``/v1/explain`` as any client, within the same limits; when the server
has a token, the API answers 401 and the page asks for the token, then sends it as
``Authorization: Bearer TOKEN`` (kept in the tab's sessionStorage only).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse

__all__ = ["index", "page_html"]


@cache
def page_html() -> str:
    """The page's HTML (read once)."""
    return files(__package__).joinpath("page.html").read_text(encoding="utf-8")


async def index(request: Request) -> HTMLResponse:
    """``GET /``: the page. It holds no data of the run (the run's name and engine come from
    ``/readyz``, behind the token), so it is served without the token: a browser cannot send
    one when it opens a URL."""
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})
