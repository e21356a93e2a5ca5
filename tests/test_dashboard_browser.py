"""The operator's dashboard in a real headless browser (Debian's chromium + chromium-driver, driven by selenium)
against a real server subprocess: the log-in form, the fleet page and a camera page load with no console errors,
load nothing from another origin, draw their charts with the vendored uPlot, and show the numbers in the database."""

import json
import shutil
import sqlite3
import time
import urllib.parse

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.testing import ServerProcess
from tiny_bundle import make_tiny_bundle

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver are not "
                                "installed (apt-get install -y chromium chromium-driver; scripts/install.sh)")


def _ingest(srv, bundle, cam, token, n, seed, spacing_ms=10_000):
    coder = RangeCoder(bundle.tables)
    now = int(time.time() * 1000)
    symbols = np.random.default_rng(seed).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    frames = [wire.Frame(i, now - spacing_ms * (n - i), compress(s, coder, bundle.model_tag))
              for i, s in enumerate(symbols)]
    with srv.stream() as c:
        assert c.hello(wire.Hello(bundle.model_tag, cam, token)) == wire.Welcome()
        for j in range(0, n, 25):
            assert c.send(wire.Batch(1, frames[j:j + 25])) == [wire.Ack(1, j, len(frames[j:j + 25]))]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    bundle = make_tiny_bundle(root / "bundle")
    db = root / "frames.db"
    with ServerProcess(bundle.path, db) as srv:
        tokens = {cam: srv.add_camera(cam) for cam in ("cam-a", "cam-b", "cam-idle")}
        _ingest(srv, bundle, "cam-a", tokens["cam-a"], 150, seed=1)
        _ingest(srv, bundle, "cam-b", tokens["cam-b"], 60, seed=2)
        key = srv.add_operator("viewer", "read")
        yield srv, bundle, db, key


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _same_origin_only(driver, origin):
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [u for u in urls if not u.startswith(origin)]


def _rows(db, sql, args=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def test_login_then_camera_page_matches_the_database(env, browser):
    srv, bundle, db, key = env
    classes = list(bundle.classes)
    browser.get(srv.url + "/dashboard/cameras/cam-a")
    assert urllib.parse.urlparse(browser.current_url).path == "/dashboard/login"  # not logged in: the form
    browser.find_element(By.ID, "key").send_keys("tco_not-a-key")
    browser.find_element(By.ID, "login-submit").click()
    # the click only starts the form's POST: wait for the answer page instead of reading the old one
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "login-error"))
    assert "unknown or revoked key" in browser.find_element(By.ID, "login-error").text
    browser.get_log("browser")  # the 401 of the refused log-in is expected: start the console check after it
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "login-submit").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "camera-id"))
    assert urllib.parse.urlparse(browser.current_url).path == "/dashboard/cameras/cam-a"  # back where we wanted
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "chart-bytes").get_attribute("data-ready"))

    (n, nbytes, model), = _rows(db, "SELECT count(*), sum(length(payload)), max(model_id) FROM frames "
                                    "WHERE camera_id='cam-a'")
    assert browser.find_element(By.ID, "frames").text == str(n) == "150"
    assert browser.find_element(By.ID, "payload-bytes").text == str(nbytes)
    assert browser.find_element(By.ID, "model").text == model == bundle.model_id
    assert browser.find_element(By.ID, "status").text == "online"
    # recent predictions: the 50 newest frames, newest first, class and confidence as stored
    recent = _rows(db, "SELECT seq, prediction, confidence, length(payload) FROM frames WHERE camera_id='cam-a' "
                       "ORDER BY ts_capture_ms DESC LIMIT 50")
    shown = [(int(r.find_element(By.CSS_SELECTOR, ".seq").text), r.find_element(By.CSS_SELECTOR, ".class").text,
              r.find_element(By.CSS_SELECTOR, ".confidence").text, int(r.find_element(By.CSS_SELECTOR, ".bytes").text))
             for r in browser.find_elements(By.CSS_SELECTOR, "#recent tbody tr")]
    assert shown == [(s, classes[p], f"{c:.3f}", b) for s, p, c, b in recent]
    # class counts in the window (all 150 frames are within the last hour) and the charts' data
    by_class = dict((classes[p], k) for p, k in _rows(db, "SELECT prediction, count(*) FROM frames "
                                                          "WHERE camera_id='cam-a' GROUP BY prediction"))
    totals = {r.get_attribute("data-class"): int(r.find_elements(By.TAG_NAME, "td")[1].text)
              for r in browser.find_elements(By.CSS_SELECTOR, "#class-totals tbody tr")}
    assert totals == by_class
    chart = json.loads(browser.find_element(By.ID, "chart-data").get_attribute("textContent"))
    assert {name: sum(v) for name, v in zip(chart["classes"], chart["counts"])} == by_class
    assert sum(chart["bytes_per_s"]) * chart["interval_s"] == pytest.approx(nbytes)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-classes .uplot canvas")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-bytes .uplot canvas")) == 1
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chart-classes .u-legend .u-label")]
    assert set(by_class) <= set(legend)
    assert _console_errors(browser) == []
    assert _same_origin_only(browser, srv.url) == []


def test_fleet_page_matches_the_database(env, browser):
    srv, bundle, db, key = env
    browser.get(srv.url + "/dashboard/")  # the cookie from the log-in above
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "fleet"))
    counts = dict(_rows(db, "SELECT camera_id, count(*) FROM frames GROUP BY camera_id"))
    last_seen = dict(_rows(db, "SELECT camera_id, max(ts_stored_ms) FROM frames GROUP BY camera_id"))
    rows = {r.get_attribute("data-camera"): r for r in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")}
    assert set(rows) == {"cam-a", "cam-b", "cam-idle"}
    for cam, row in rows.items():
        cell = lambda cls: row.find_element(By.CSS_SELECTOR, "." + cls)  # noqa: E731
        assert int(cell("frames").text) == counts.get(cam, 0)
        assert cell("status").text == ("online" if cam in counts else "offline")
        assert cell("model").text == (bundle.model_id if cam in counts else "–")
        assert cell("last-seen").get_attribute("data-ms") == str(last_seen.get(cam, ""))
        if cam in counts:  # everything was stored within the last minute
            nbytes = _rows(db, "SELECT sum(length(payload)) FROM frames WHERE camera_id=?", (cam,))[0][0]
            assert cell("uplink").text == f"{nbytes / 60:.1f}"
    assert browser.find_element(By.ID, "total-frames").text == str(sum(counts.values()))
    assert browser.find_element(By.ID, "total-online").text == "2"
    rows["cam-b"].find_element(By.CSS_SELECTOR, ".camera a").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "camera-id"))
    assert browser.find_element(By.ID, "frames").text == str(counts["cam-b"])
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "chart-bytes").get_attribute("data-ready"))
    assert _console_errors(browser) == []
    assert _same_origin_only(browser, srv.url) == []


def test_pages_need_an_operator(env, browser):
    srv, _, _, key = env
    import urllib.error
    import urllib.request

    for path in ("/dashboard/", "/dashboard/cameras/cam-a"):
        req = urllib.request.Request(srv.url + path)
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                  {"redirect_request": lambda *a, **k: None}))
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(req, timeout=30)
        assert err.value.code == 303 and err.value.headers["Location"].startswith("/dashboard/login?next=")
    # a Bearer header works as well as the cookie; a metrics-only key may not read the pages
    with urllib.request.urlopen(srv.request("/dashboard/", key), timeout=30) as r:
        assert r.status == 200 and "cam-a" in r.read().decode()
    scraper = srv.add_operator("scraper-d", "metrics")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.request("/dashboard/", scraper), timeout=30)
    assert err.value.code == 403
    browser.get(srv.url + "/dashboard/")
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "login"))
    browser.get(srv.url + "/dashboard/")
    assert urllib.parse.urlparse(browser.current_url).path == "/dashboard/login"
