"""The page at ``GET /ui`` in a real headless Chromium, against a real server (docs/ui.md).

One server for the module serves three models: the bootstrapped ``imagenet-lite0``, a copy under
another name (to switch models) and a copy whose labels are HTML with an ``onerror`` handler (the
XSS case). It runs one worker with a 2 MB upload limit (to meet 413 cheaply) and one upload
received at a time (a held upload then gives a real 503 with Retry-After). The API's own answers are
fetched with httpx while the page is idle, and the page must show exactly those messages.
Screenshots of every state go under pytest's tmp_path. Waits are generous WebDriverWait timeouts;
nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imgclf.devserver import LiveServer
from tests.support import browser as browser_support
from tests.support import images
from tests.support.browser import (
    UiPage,
    chromium,
    console_errors,
    give_files,
    held_upload,
    require_binaries,
    slow_uplink,
    wait_for,
)
from tests.support.servers import NAME, add_model, copy_repo, serve

pytestmark = pytest.mark.slow

COPY = "imagenet-lite0-copy"
XSS_MODEL = "xss-labels"
XSS = '<img src=x onerror="window.__xss = 1">'
CATS = {"tiger cat", "Egyptian cat", "tabby"}
UPLOAD_LIMIT = 2_000_000
NOT_AN_IMAGE = b"these are notes, not a photo\n" * 20


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    require_binaries()  # skip (or fail in CI); `page` asks for this before the server
    with chromium(tmp_path_factory.mktemp("chromium") / "profile") as driver:
        yield driver


@pytest.fixture(scope="module")
def server(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("ui")
    repo = copy_repo(imagenet_repo, root / "models").root
    add_model(repo, COPY)
    add_model(repo, XSS_MODEL, XSS + " ")
    with serve(repo, root / "home", IMGCLF_WORKERS="1", IMGCLF_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
               IMGCLF_MAX_RECEIVING="1", IMGCLF_MIN_UPLOAD_RATE="0", IMGCLF_DEFAULT_MODEL=NAME) as live:
        yield live


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    out = {
        "chelsea.jpg": images.encode(images.photo().convert("RGB"), "JPEG", quality=90),
        "coffee.png": images.encode(images.photo((200, 133), "coffee"), "PNG"),
        "notes.jpg": NOT_AN_IMAGE,
        "huge.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * (UPLOAD_LIMIT // 256 + 4096),
        f"{XSS}.jpg": NOT_AN_IMAGE,
    }
    for name, data in out.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in out}


@pytest.fixture(scope="module")
def explain_answer(server: LiveServer, files: dict[str, Path]) -> httpx.Response:
    """What POST /explain answers for the photo: the page draws its heatmap from the same answer."""
    answer = server.client.post("/explain", files={"image": ("chelsea.jpg", files["chelsea.jpg"].read_bytes())})
    assert answer.status_code == 200, answer.text
    return answer


@pytest.fixture
def page(browser: object, server: LiveServer, explain_answer: httpx.Response, tmp_path: Path) -> UiPage:
    browser.set_window_size(1280, 900)
    return UiPage(browser, server.url, tmp_path / "screenshots").open()


def api_error(server: LiveServer, path: str, files: list[tuple[str, tuple[str, bytes]]], **data: str) -> dict:
    response = server.client.post(path, files=files, data=data)
    assert response.status_code >= 400, response.text
    return response.json()


def test_page_and_assets_carry_a_strict_policy(server: LiveServer) -> None:
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/icon.svg", "/ui/missing.js"):
        response = server.client.get(path)
        assert response.status_code == (404 if "missing" in path else 200), path
        policy = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
        assert all("unsafe" not in v and "*" not in v and "http" not in v for v in policy.values()), policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert server.client.get("/ui/missing.js").json()["kind"] == "not_found"
    assert server.client.post("/ui").status_code == 405
    html = server.client.get("/ui").text
    assert "<script src=\"/ui/app.js\" defer></script>" in html and html.count("<script") == 1
    assert not re.search(r"\s(on[a-z]+|style)\s*=", html)  # no inline handler, no inline style
    for asset in ("/ui", "/ui/app.js", "/ui/style.css"):  # no CDN, no web font
        text = server.client.get(asset).text
        assert "http://" not in text and "https://" not in text and "@import" not in text, asset
    script = server.client.get("/ui/app.js").text  # text only: no HTML sink anywhere in the script
    assert not [s for s in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                            "new Function", "setAttribute(\"on") if s in script]


def test_the_route_answers_only_its_own_paths() -> None:
    """UiRoute's row of the route table: other paths (``/uix``, ``/models``) go on to the app; HEAD has no body."""
    from service.http.routes import Endpoint, mount
    from service.http.ui import CSP, PREFIX, UiRoute

    async def app(scope: dict, receive: object, send: object) -> None:
        passed.append(scope["path"])

    async def call(method: str, path: str) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        routed = mount([Endpoint(PREFIX, UiRoute(), prefix=True)], app)
        await routed({"type": "http", "method": method, "path": path}, None, send)
        return sent

    passed: list[str] = []
    assert asyncio.run(call("GET", "/uix")) == [] and asyncio.run(call("GET", "/models")) == []
    assert passed == ["/uix", "/models"]
    start, body = asyncio.run(call("HEAD", "/ui"))
    headers = dict(start["headers"])
    assert start["status"] == 200 and body["body"] == b"" and int(headers[b"content-length"]) > 1000
    assert headers[b"content-security-policy"] == CSP.encode()


def test_a_missing_browser_skips_with_the_install_command_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_support, "find_binaries", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser_support.require_binaries()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        browser_support.require_binaries()


def test_a_photo_shows_its_label_the_model_and_the_latency(page: UiPage, explain_answer: httpx.Response,
                                                          files: dict[str, Path]) -> None:
    assert page.upload(files["chelsea.jpg"]) == "done"
    labels = page.text("#predictions .label")
    assert len(labels) == 5 and labels[0] in CATS, labels
    assert all(s.endswith("%") for s in page.text("#predictions .score"))
    answered = page.by_id("answered-by").text
    assert f"Answered by {NAME} version 1 in " in answered and " ms" in answered, answered
    assert labels[0] in page.by_id("status").text  # the aria-live region says it too
    assert page.js("return document.getElementById('progress').value") == 100
    assert page.js("return localStorage.length + sessionStorage.length + document.cookie.length") == 0
    note, toggle = page.by_id("explain-note"), page.by_id("heatmap-toggle")
    assert note.get_attribute("data-state") == "done" and toggle.is_enabled(), note.text
    page.shot("photo")
    assert not console_errors(page.driver)


def test_the_heatmap_turns_on_and_off(page: UiPage, explain_answer: httpx.Response, files: dict[str, Path]) -> None:
    assert explain_answer.status_code == 200, explain_answer.text
    assert page.upload(files["chelsea.jpg"]) == "done"
    crop, toggle = page.by_id("crop"), page.by_id("heatmap-toggle")
    assert page.by_id("explain-note").get_attribute("data-state") == "done", page.by_id("explain-note").text
    assert toggle.is_enabled() and toggle.is_selected() and crop.get_attribute("data-heatmap") == "on"
    pixels = "return document.getElementById('crop').toDataURL()"
    with_heatmap = page.js(pixels)
    page.shot("heatmap-on")
    toggle.send_keys(" ")  # the keyboard works the toggle
    wait_for(page.driver, lambda d: crop.get_attribute("data-heatmap") == "off", "the heatmap off")
    assert page.js(pixels) != with_heatmap and "heatmap" not in crop.get_attribute("aria-label")
    page.shot("heatmap-off")
    toggle.click()
    wait_for(page.driver, lambda d: crop.get_attribute("data-heatmap") == "on", "the heatmap on again")
    assert page.js(pixels) == with_heatmap
    assert not console_errors(page.driver)


def test_a_text_file_named_jpg_shows_the_415_message(page: UiPage, server: LiveServer, files: dict[str, Path]) -> None:
    expected = api_error(server, "/classify", [("image", ("notes.jpg", NOT_AN_IMAGE))])
    assert expected["status"] == 415
    assert page.upload(files["notes.jpg"]) == "error"
    error = page.by_id("error")
    assert error.is_displayed() and expected["error"] in error.text and "Error 415" in error.text, error.text
    assert not page.by_id("single").is_displayed()
    page.shot("error-415")
    assert not console_errors(page.driver)


def test_a_bad_top_k_and_a_large_file_show_the_apis_messages(page: UiPage, server: LiveServer,
                                                            files: dict[str, Path]) -> None:
    huge = files["huge.jpg"]
    too_large = api_error(server, "/classify", [("image", ("huge.jpg", huge.read_bytes()))])
    bad_k = api_error(server, "/classify", [("image", ("c.jpg", files["chelsea.jpg"].read_bytes()))], top_k="0")
    assert (too_large["status"], bad_k["status"]) == (413, 400)
    top_k = page.by_id("top-k")
    top_k.clear()
    top_k.send_keys("0\t")  # typed, then Tab: the change comes before any file, so nothing runs yet
    assert page.run() == 0
    assert page.upload(files["chelsea.jpg"]) == "error"
    assert bad_k["error"] in page.by_id("error").text, page.by_id("error").text
    page.shot("error-400")
    # With a photo chosen, a change of the number asks again. Select and overtype, not clear(): WebDriver's
    # clear() fires a change of its own, whose upload (the server receives one at a time) could still be
    # arriving when the typed number's starts, a real 503 under load.
    from selenium.webdriver.common.keys import Keys

    before = page.run()
    top_k.send_keys(Keys.CONTROL, "a")
    top_k.send_keys("5\t")
    assert page.settle(before) == "done" and len(page.text("#predictions .label")) == 5
    assert page.run() == before + 1  # one change, one run
    assert page.upload(huge) == "error"
    assert too_large["error"] in page.by_id("error").text and "413" in page.by_id("error").text
    page.shot("error-413")


def test_an_overloaded_service_shows_503_with_retry_after(page: UiPage, server: LiveServer,
                                                         files: dict[str, Path]) -> None:
    photo = {"image": ("c.jpg", files["chelsea.jpg"].read_bytes())}
    with held_upload(server.client.base_url.host, server.client.base_url.port, "/classify") as hold:
        def refused_now(_: object) -> httpx.Response | None:
            hold()
            response = server.client.post("/classify", files=photo)
            return response if response.status_code == 503 else None

        refused = wait_for(page.driver, refused_now, "the API's 503")
        assert refused.headers["retry-after"] == "1", refused.text
        assert page.upload(files["chelsea.jpg"]) == "error"
        error = page.by_id("error").text
        assert refused.json()["error"] in error and "Error 503" in error and "try again in 1 s" in error, error
        page.shot("error-503")
    wait_for(page.driver, lambda d: server.client.post("/classify", files=photo).is_success, "the slot free again")
    before = page.run()
    page.driver.find_element("css selector", "#error button").click()  # "Try again"
    assert page.settle(before) == "done" and page.text("#predictions .label")[0] in CATS


def test_several_files_give_one_row_each(page: UiPage, server: LiveServer, files: dict[str, Path]) -> None:
    names = ["chelsea.jpg", "coffee.png", "notes.jpg"]
    expected = server.client.post("/classify_batch", files=[("images", (n, files[n].read_bytes())) for n in names])
    assert expected.status_code == 200, expected.text
    assert page.upload(*(files[n] for n in names)) == "done"
    rows = page.js("return [...document.querySelectorAll('#batch-table tbody tr')].map((r) => "
                   "[r.dataset.status, ...[...r.cells].map((c) => c.textContent)])")
    assert [r[0] for r in rows] == ["ok", "ok", "error"] and [r[2] for r in rows] == names, rows
    assert rows[0][3] in CATS and rows[1][3] == expected.json()["results"][1]["predictions"][0]["label"]
    assert expected.json()["results"][2]["error"]["message"] in rows[2][3], rows[2]
    assert page.by_id("batch-caption").text == "3 files: 2 answered, 1 refused"
    page.shot("batch")
    assert not console_errors(page.driver)


def test_switching_models_with_the_keyboard(page: UiPage, server: LiveServer, files: dict[str, Path]) -> None:
    served = [m["name"] for m in server.client.get("/models").json()["models"]]
    options = page.js("return [...document.querySelectorAll('#model option')].map((o) => o.value)")
    assert options == served and set(served) == {NAME, COPY, XSS_MODEL}, options
    assert page.upload(files["chelsea.jpg"]) == "done"
    assert page.text("#single .model-name") == [NAME]
    first = page.text("#predictions .label")
    before = page.run()
    model = page.by_id("model")
    assert model.get_attribute("value") == NAME
    model.send_keys("\ue015")  # arrow down: the next model, and the page asks it at once
    assert page.settle(before) == "done"
    assert page.text("#single .model-name") == [COPY] and page.text("#predictions .label") == first
    page.shot("switched-model")


def test_labels_and_file_names_are_text_never_html(page: UiPage, files: dict[str, Path]) -> None:
    from selenium.webdriver.support.ui import Select

    before = page.run()
    Select(page.by_id("model")).select_by_value(XSS_MODEL)  # no file yet: nothing runs
    assert page.run() == before
    assert page.upload(files["chelsea.jpg"]) == "done"
    top = page.text("#predictions .label")[0]
    assert top.startswith(XSS + " ") and top.removeprefix(XSS + " ") in CATS, top
    assert page.by_id("status").text.startswith(f"{XSS_MODEL} version 1: {XSS} ")
    page.shot("xss-labels")
    assert page.upload(files[f"{XSS}.jpg"], files["chelsea.jpg"]) == "done"
    assert page.text("#batch-table td.file") == [f"{XSS}.jpg", "chelsea.jpg"]
    assert page.js("return document.querySelectorAll('img').length") == 0
    assert page.js("return typeof window.__xss") == "undefined"
    page.shot("xss-batch")
    assert not console_errors(page.driver)


def test_the_browser_enforces_the_policy(page: UiPage) -> None:
    outcome = page.driver.execute_async_script("""
        const done = arguments[arguments.length - 1], seen = [];
        document.addEventListener("securitypolicyviolation", (e) => seen.push(e.violatedDirective));
        const script = document.createElement("script");
        script.textContent = "window.__inline = 1";
        document.body.append(script);
        const div = document.createElement("div");
        div.setAttribute("onclick", "window.__handler = 1");
        document.body.append(div);
        div.click();
        setTimeout(() => done({seen, inline: typeof window.__inline, handler: typeof window.__handler}), 500);
    """)
    assert outcome["inline"] == outcome["handler"] == "undefined", outcome
    assert outcome["seen"] and all(d.startswith("script-src") for d in outcome["seen"]), outcome


def test_drop_and_paste_take_a_photo(page: UiPage, files: dict[str, Path]) -> None:
    before = page.run()
    give_files(page.driver, "drop", {"chelsea.jpg": files["chelsea.jpg"].read_bytes()})
    assert page.settle(before) == "done" and page.text("#predictions .label")[0] in CATS
    before = page.run()
    give_files(page.driver, "paste", {"coffee.png": files["coffee.png"].read_bytes()}, target="body")
    assert page.settle(before) == "done" and len(page.text("#predictions .label")) == 5


def test_keyboard_and_screen_reader_basics(page: UiPage, files: dict[str, Path]) -> None:
    unlabelled = page.js("return [...document.querySelectorAll('input, select, button')]"
                         ".filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.id)")
    assert unlabelled == []
    assert page.by_id("status").get_attribute("aria-live") == "polite"
    assert page.by_id("error").get_attribute("role") == "alert"
    assert page.by_id("crop").get_attribute("role") == "img"
    assert page.js("return document.documentElement.lang") == "en"
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    order = []
    page.open()  # a fresh document: the first Tab starts at its top
    for _ in range(4):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        order.append(page.js("const a = document.activeElement; return a.id || a.className"))
    assert order == ["skip", "model", "top-k", "files"], order


def test_a_phone_sized_viewport_reads_without_sideways_scrolling(page: UiPage, files: dict[str, Path]) -> None:
    page.driver.set_window_size(375, 740)
    page.open()
    assert page.upload(files["chelsea.jpg"]) == "done"
    overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.js(overflow) <= 0
    assert page.js("return document.getElementById('crop').getBoundingClientRect().right") <= 375
    page.shot("phone")
    assert page.upload(files["chelsea.jpg"], files["coffee.png"], files["notes.jpg"]) == "done"
    assert page.js(overflow) <= 0
    page.shot("phone-batch")


def test_a_large_photo_shows_upload_progress(page: UiPage, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(images.encode(images.photo((2400, 1600)).convert("RGB"), "JPEG", quality=98, subsampling=0))
    assert 500_000 < big.stat().st_size < UPLOAD_LIMIT
    with slow_uplink(page.driver, 256 * 1024):  # a phone's uplink: the upload takes seconds
        before = page.run()
        page.by_id("files").send_keys(str(big))
        midway = wait_for(page.driver, lambda d: d.execute_script(
            "const p = document.getElementById('progress');"
            "return !document.getElementById('upload').hidden && p.value > 0 && p.value < 100 "
            "  ? document.getElementById('progress-label').textContent : null"), "upload progress")
        assert "big.jpg" in midway and "%" in midway and "MB" in midway, midway
        page.shot("upload-progress")
        assert page.settle(before) == "done"
    assert not page.by_id("upload").is_displayed()
