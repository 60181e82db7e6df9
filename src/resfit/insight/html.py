"""The HTML kit of the reports (run report, multi-label report, audit and tune pages): escaping,
tables, sections, embedded images, and the shared CSS and Content-Security-Policy."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence

from matplotlib.figure import Figure
from PIL import Image, ImageOps

from ..data.paths import display_text

THUMB = 192  # thumbnail side in pixels


# ---------------------------------------------------------------------------------------------
# Small helpers


def escape(value: object) -> str:
    return html.escape(display_text(str(value)), quote=True)


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{escape(alt)}">'


def thumbnail(path: str | os.PathLike) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * THUMB, 2 * THUMB))  # JPEG: decode at reduced size, fast
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError):
        return None
    im.thumbnail((THUMB, THUMB))
    return im


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells must already be escaped (they may hold markup)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def finite(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2430;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px}
header h1{margin:0 0 4px;font-size:26px}header p{margin:0;color:#5b6472}
nav{margin:14px 0;font-size:14px}nav a{margin-right:12px;color:#2459a8;text-decoration:none}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 20px;margin:18px 0}
h2{margin:0 0 10px;font-size:20px}h3{font-size:16px;margin:14px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 170px;border:1px solid #dde1e7;border-radius:6px;padding:10px 12px;background:#fafbfc}
.card .k{font-size:12px;text-transform:uppercase;color:#5b6472}.card .v{font-size:24px;font-weight:600}
.card .s{font-size:12px;color:#5b6472}
.warn{background:#fff6e0;border-left:4px solid #e0a100;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border-bottom:1px solid #e4e7ec;padding:4px 10px;text-align:left;word-break:break-all}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#c0262d;font-weight:600}
img.fig{max-width:100%;height:auto;display:block;margin:8px 0}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure.wrong{margin:0;border:1px solid #dde1e7;border-radius:6px;padding:8px;background:#fafbfc;width:340px}
figure.wrong img.thumb{width:164px;height:164px;object-fit:contain;background:#eee;margin-right:4px}
figure.wrong figcaption{font-size:13px;margin-top:4px;word-break:break-all}
.missing{display:inline-block;width:164px;height:164px;background:#eee;color:#777;font-size:12px;text-align:center;line-height:164px;vertical-align:top}
.big{font-size:30px;font-weight:600;margin:4px 0}.ci{font-size:16px;font-weight:400;color:#5b6472}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:13px;max-height:600px}
footer{color:#8a93a0;font-size:12px;margin:20px 0}
"""

# Nothing may be fetched, nothing may run: only inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
