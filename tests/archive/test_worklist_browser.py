"""The worklist page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Logs in with a token, sees the STAT study at the top with its finding and key
image thumbnail and the failed study marked, watches a newly triaged study
appear without a reload (Server-Sent Events), marks it opened, and saves a
screenshot to test-artifacts/. No browser or driver is downloaded: the
system chromedriver is passed explicitly, so Selenium Manager never runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from archive.config import HttpToken, Settings, WebhookTarget
from archive.db import Database
from archive.http import AppContext, HttpService, TokenBook, create_app
from archive.index import ReadingStatus
from archive.ingest import Ingest
from archive.outbox import DeliveryService
from archive.store import FileStore
from tests.peers import REPO_ROOT
from tests.worklist_support import WebhookReceiver, triaged_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-test-token-0123456789"
ARTIFACTS = REPO_ROOT / "test-artifacts"

pytestmark = pytest.mark.network


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(
            "chromium and chromedriver are required (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[str, Database, Ingest, Settings]]:
    receiver = WebhookReceiver().__enter__()
    settings = Settings(
        data_dir=tmp_path / "node",
        fsync=False,
        http_port=0,
        worklist_poll_seconds=0.25,
        http_tokens=[HttpToken(name="dr-browser", token=TOKEN, scopes=["read", "write"])],
        alert_webhooks=[WebhookTarget(name="pager", url=receiver.url)],
    )
    db = Database(settings.resolved_database_url, durable=False)
    db.upgrade()
    store = FileStore(settings.data_dir, fsync=False)
    ingest = Ingest(db, store)
    ctx = AppContext(
        settings=settings,
        db=db,
        file_store=store,
        ingest=ingest,
        tokens=TokenBook.from_settings(settings),
    )
    service = HttpService(settings, create_app(ctx))
    service.start()
    delivery = DeliveryService(db, settings, store, interval=0.25)
    delivery.start()
    yield f"http://127.0.0.1:{service.port}", db, ingest, settings
    delivery.stop()
    ctx.extras["stopping"] = True
    service.stop()
    db.dispose()
    receiver.__exit__()


def click(driver: webdriver.Chrome, selector: str) -> bool:
    """Find and click in one go (a live update may replace the element in between)."""
    driver.find_element(By.CSS_SELECTOR, selector).click()
    return True


def rows(driver: webdriver.Chrome) -> list[str]:
    return [r.get_attribute("data-uid") for r in driver.find_elements(By.CSS_SELECTOR, "tr.row")]


def test_login_stat_on_top_live_update_and_mark_opened(browser, node) -> None:
    base, db, ingest, settings = node
    routine = triaged_study(db, ingest, settings, probability=0.02)
    failed = triaged_study(
        db, ingest, settings, probability=None, failure_reason="pixel data could not be decoded"
    )
    stat = triaged_study(db, ingest, settings, probability=0.97)
    # The list re-renders on every live update: an element found a moment ago may be gone.
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))

    browser.get(f"{base}/worklist")
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    assert "token" not in browser.current_url
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login-button").click()
    wait.until(lambda d: len(rows(d)) == 3)
    assert "token" not in browser.current_url and TOKEN not in browser.current_url

    top = browser.find_elements(By.CSS_SELECTOR, "tr.row")[0]
    assert top.get_attribute("data-uid") == stat.study_instance_uid
    assert "prio-STAT" in top.get_attribute("class")
    assert top.find_element(By.CSS_SELECTOR, ".badge").text == "STAT"
    assert "Hemorrhage (p=0.97)" in top.find_element(By.CSS_SELECTOR, ".finding").text
    wait.until(
        lambda d: (
            d.execute_script(
                "const i = document.querySelector('tr.row img.thumb');"
                " return i ? i.naturalWidth : 0"
            )
            > 0
        )
    )
    assert rows(browser) == [
        stat.study_instance_uid,
        routine.study_instance_uid,
        failed.study_instance_uid,
    ]
    # The STAT result paged the configured receiver; the row says so once it is sent.
    wait.until(
        lambda d: "alert to pager: sent" in d.find_elements(By.CSS_SELECTOR, "tr.row")[0].text
    )
    failed_row = browser.find_element(
        By.CSS_SELECTOR, f'tr[data-uid="{failed.study_instance_uid}"]'
    )
    assert "failed" in failed_row.get_attribute("class")
    assert "AI could not analyse this study" in failed_row.text
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")

    # A new study is triaged while the page is open: it appears without a reload.
    browser.execute_script("window.__sameDocument = 'yes'")
    newer = triaged_study(db, ingest, settings, probability=0.99)
    wait.until(lambda d: rows(d)[:1] == [newer.study_instance_uid])
    assert browser.execute_script("return window.__sameDocument") == "yes"
    assert rows(browser)[1] == stat.study_instance_uid

    wait.until(
        lambda d: click(d, f'tr[data-uid="{newer.study_instance_uid}"] button.action-opened')
    )
    wait.until(
        lambda d: (
            d.find_element(
                By.CSS_SELECTOR, f'tr[data-uid="{newer.study_instance_uid}"] .reading-status'
            ).text
            == "opened"
        )
    )
    with db.reader() as session:
        status = session.get(ReadingStatus, newer.study_pk)
        assert status is not None
        assert (status.reading_state, status.opened_by) == ("opened", "dr-browser")

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "worklist.png"
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000

    # Keyboard: j moves the selection down, Enter enlarges the key image, Escape closes it.
    body = browser.find_element(By.TAG_NAME, "body")
    selected = lambda d: d.find_element(By.CSS_SELECTOR, "tr.row.selected").get_attribute(  # noqa: E731
        "data-uid"
    )
    before = selected(browser)
    body.send_keys("j")
    wait.until(lambda d: selected(d) != before)
    body.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "viewer").is_displayed())
    image = browser.find_element(By.ID, "viewer-image")
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    browser.save_screenshot(str(ARTIFACTS / "worklist-key-image.png"))
    body.send_keys(Keys.ESCAPE)
    wait.until(lambda d: not d.find_element(By.ID, "viewer").is_displayed())

    # On a phone the rows become cards: nothing is cut off sideways.
    browser.set_window_size(390, 844)
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 400)
    overflow = browser.execute_script(
        "return document.scrollingElement.scrollWidth - window.innerWidth"
    )
    assert overflow <= 1
    browser.save_screenshot(str(ARTIFACTS / "worklist-phone.png"))
    browser.set_window_size(1400, 1000)

    # The quality view counts the model's flagged studies.
    browser.get(f"{base}/worklist/quality")
    wait.until(lambda d: "test-ich 1.0.0" in d.find_element(By.ID, "models").text)


def test_system_browser_is_used(browser) -> None:
    """The session runs the Debian chromium, not a downloaded one."""
    version = browser.capabilities.get("browserVersion", "")
    assert version and shutil.which("chromium")
