"""The page at / of resfit serve, in a real headless Chromium (Playwright drives Debian's
/usr/bin/chromium; no browser download): a real flower photo gets the label resfit predict
gives and a Grad-CAM image, a text file a readable error, and with a token the page asks for it.
Also /v1/explain itself, in-process."""

# ruff: noqa: F811  (the Server helper of tests/test_serve.py is imported)

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.test_serve import TOKEN, Server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def _playwright():
    """Playwright's sync API and Chromium, or a skip (a failure where CI installed them)."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"needs {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "needs playwright (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("RESFIT_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs both
            pytest.fail(missing)
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def flower_run(flowers_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-20 run on 6 photos a class of flowers5 (a second of training)."""
    import resfit

    data = tmp_path_factory.mktemp("page-data")
    for split, n in (("train", 6), ("val", 2)):
        for cls in sorted(p for p in (flowers_root / split).iterdir() if p.is_dir()):
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.jpg"))[:n]:
                shutil.copy(f, data / split / cls.name / f.name)
    out = tmp_path_factory.mktemp("page-run") / "flowers"
    resfit.train(data=str(data), out=str(out), arch="resnet20_cifar", img_size=32, epochs=1,
                 progress=False, report=False, leakage="off")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def photo(flowers_root: Path) -> Path:
    """A validation photo the run never trained on."""
    cls = sorted(p for p in (flowers_root / "val").iterdir() if p.is_dir())[-1]
    return sorted(cls.glob("*.jpg"))[-1]


@pytest.fixture(scope="module")
def server(flower_run: Path) -> Iterator[Server]:
    """One server with a token for every test here (a server start is seconds)."""
    s = Server(flower_run, token=TOKEN)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _card(page, name: str):
    """The result card of the file ``name``, once it is answered (or refused)."""
    card = page.locator(".card", has=page.locator("h2", has_text=name))
    card.and_(page.locator("[data-state=done], [data-state=error]")).wait_for(timeout=30_000)
    return card


@pytest.mark.shared
def test_page_shows_predict_label_gradcam_and_a_readable_error(
    server: Server, flower_run: Path, photo: Path, browser, tmp_path: Path
) -> None:
    from resfit.inference.predictor import Predictor

    (offline,), _ = Predictor.from_run(flower_run).predict([photo], top_k=3)
    text = tmp_path / "notes.txt"
    text.write_text("not a photo at all\n")
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        # The token as the page keeps it once given (the next test gives it through the page).
        page.add_init_script(f"sessionStorage.setItem('resfit-token', '{TOKEN}')")
        page.goto(server.url + "/")
        page.locator("#run").filter(has_text=flower_run.name).wait_for()
        page.set_input_files("#files", [str(photo), str(text)])

        good = _card(page, photo.name)
        assert good.get_attribute("data-state") == "done"
        assert good.locator(".label").inner_text() == offline.label
        first = good.locator("tr").first.locator("td")
        assert first.nth(0).inner_text() == offline.label
        assert abs(float(first.nth(1).inner_text().split()[0]) - 100 * offline.confidence) < 0.06
        cam = good.locator("img.cam")
        src = cam.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        assert cam.evaluate("i => i.complete && i.naturalWidth") == 128  # 32 px shown at 128
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert len(im.convert("RGB").getcolors(1 << 16)) > 100  # a picture, not a blank
        assert "Grad-CAM" in good.locator("figcaption").inner_text()

        bad = _card(page, text.name)
        assert bad.get_attribute("data-state") == "error"
        message = bad.locator(".err").inner_text()
        assert "not an image" in message and "415" in message
        assert not bad.locator("img").count()

        # The abstain flag of the unknown-input answers: a badge and the set, when present.
        page.route("**/v1/predict*", lambda route: route.fulfill(
            json={"label": None, "unknown": True, "score": 0.93, "set": ["rose", "tulip"],
                  "confidence": 0.4, "top_k": [["rose", 0.4], ["tulip", 0.35]]},
        ))  # fmt: skip
        page.set_input_files("#files", [str(photo.with_name(photo.name))])
        cards = page.locator(".card", has=page.locator(".badge.unknown"))
        cards.first.wait_for(timeout=30_000)
        assert "abstains" in cards.first.inner_text()
        assert "set: rose, tulip" in cards.first.inner_text()
        assert cards.first.locator(".label").inner_text() == "unknown"
        assert page.locator("#token-panel").is_hidden()
    finally:
        page.close()


@pytest.mark.shared
def test_page_asks_for_the_token_and_sends_it(
    server: Server, flower_run: Path, photo: Path, browser
) -> None:
    page = browser.new_page()
    try:
        page.goto(server.url + "/")  # the page itself opens without the token
        panel = page.locator("#token-panel")
        panel.wait_for(state="visible")
        assert "needs a token" in panel.inner_text()
        page.set_input_files("#files", [str(photo)])
        refused = _card(page, photo.name)
        assert "token" in refused.locator(".err").inner_text()

        page.fill("#token", "wrong")
        page.click("#token-panel button")
        panel.wait_for(state="visible")  # refused again: asked again
        assert "refused" in panel.inner_text()
        page.fill("#token", TOKEN)
        page.click("#token-panel button")
        page.locator("#run").filter(has_text=flower_run.name).wait_for()
        card = page.locator(".card[data-state=done]", has=page.locator("h2", has_text=photo.name))
        card.wait_for(timeout=30_000)  # the file refused for the token is sent again
        assert card.locator("img.cam").get_attribute("src").startswith("data:image/png")
    finally:
        page.close()


@pytest.mark.shared
def test_explain_api_names_its_class_and_keeps_the_limits(flower_run: Path, photo: Path) -> None:
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    predictor = Predictor.from_run(flower_run)
    with TestClient(create_app(predictor, ServeOptions(max_images=2))) as c:
        body = photo.read_bytes()
        label = c.post("/v1/predict", content=body).json()["label"]
        one = c.post("/v1/explain", content=body).json()
        assert one["class"] == label  # unnamed: the class /v1/predict answers
        other = next(k for k in predictor.classes if k != label)
        asked = c.post("/v1/explain", params={"class": other}, content=body).json()
        assert asked["class"] == other and asked["overlay"].startswith("data:image/png;base64,")
        r = c.post("/v1/explain", params={"class": "nope"}, content=body)
        assert r.status_code == 422 and "this run knows" in r.json()["error"]
        assert c.post("/v1/explain", content=b"hello").status_code == 415
        files = [("f", (f"{i}.jpg", body)) for i in range(2)]
        many = c.post("/v1/explain", files=files).json()
        assert [m["file"] for m in many] == ["0.jpg", "1.jpg"] and many[0]["class"] == label
        files.append(("f", ("2.jpg", body)))
        assert c.post("/v1/explain", files=files).status_code == 413  # --max-images
        assert c.get("/").headers["content-type"].startswith("text/html")
