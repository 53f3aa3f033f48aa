"""A Pipeswitch server on PostgreSQL tenants with the web console, and a headless Chromium.

Two FusionPBX domains, each with an agent and its own admin token; the super-admin token
set. Providers are the session's emulators and real Piper (``served``). The browser is
Debian's ``/usr/bin/chromium`` driven by Playwright (never ``playwright install``), its
microphone a WAV of the caller's question synthesized by that Piper.
"""

from __future__ import annotations

import io
import os
import uuid as uuidlib
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from pydantic import SecretStr

from pipeswitch.config.settings import Settings
from pipeswitch.pipelines.app import Pipeswitch
from tests.conftest import QUESTION, Served
from tests.tenancy.conftest import Db, dsn
from tests.tenancy.conftest import db as db  # noqa: F401  (the session's test database)

CHROMIUM = "/usr/bin/chromium"
SUPER_TOKEN = "console-test-super-admin-token"
MIC_RATE = 16000
# Where page screenshots go: docs/console/ when PIPESWITCH_CONSOLE_SCREENSHOTS is set (the
# README's pictures), else the test's temporary folder.
SHOTS_ENV = "PIPESWITCH_CONSOLE_SCREENSHOTS"


@dataclass
class Domain:
    name: str
    uuid: uuidlib.UUID
    agent: str
    token: str


@dataclass
class ConsoleServer:
    app: Pipeswitch
    served: Served
    db: Db
    a: Domain
    b: Domain

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"


async def _domain(database: Db, label: str) -> Domain:
    duid = await database.add_domain(f"{label}-{uuidlib.uuid4().hex[:6]}.example.com")
    row = await database.store.find_domain(str(duid))
    assert row is not None
    agent = await database.add_agent(
        duid,
        agent_name=f"{label.title()} reception",
        first_message=f"Thanks for calling {label}.",
        system_prompt=f"You are the receptionist of {label}.",
        playback="json-stream",
    )
    token = await database.store.create_admin_token(duid, "console tests")
    return Domain(str(row["domain_name"]), duid, agent, token)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def console(db: Db, served: Served) -> AsyncIterator[ConsoleServer]:  # noqa: F811
    a = await _domain(db, "riverside")
    b = await _domain(db, "hillview")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        providers="emulated",
        idle_timeout_secs=30,
        database_url=SecretStr(dsn(db.name)),
        secrets_key=SecretStr(db.key),
        admin_token=SecretStr(SUPER_TOKEN),
        accept_unsigned="loopback",
        instance_id="console-tests",
    )
    app = Pipeswitch(settings, endpoints=served.app.endpoints)
    await app.start()
    try:
        yield ConsoleServer(app, served, db, a, b)
    finally:
        await app.stop(drain_secs=1.0)


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mic_wav(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone: 1 s silence, the question, 6 s silence (Chromium loops it).

    The question starts while the greeting still plays: the caller barges in on it."""
    speech = await served.speech(QUESTION, MIC_RATE)
    silence = lambda secs: b"\x00\x00" * int(MIC_RATE * secs)  # noqa: E731
    path = tmp_path_factory.mktemp("mic") / "question_16k.wav"
    path.write_bytes(wav_bytes(silence(1.0) + speech + silence(6.0), MIC_RATE))
    return path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(mic_wav: Path) -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}",
            ],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.set_default_timeout(10_000)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = os.environ.get(SHOTS_ENV)
    return Path(folder) if folder else tmp_path


async def login(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/console/login")
    await page.fill("#token", token)
    await page.click("#login")
    await page.wait_for_load_state("domcontentloaded")
