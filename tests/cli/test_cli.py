"""``pipeswitch`` as a new user meets it: help, start-up errors, what reaches the log.

Each runs the real command in its own process (the console script's module).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeswitch.bench.fakeswitch.stream import FakeSwitchStream, StreamConfig
from tests.cli.server_proc import ServeProcess, free_port, pipeswitch

DG_KEY = "dgPLANTEDkey0123456789abcdef"
GROQ_KEY = "gskPLANTEDkey0123456789abcdef"


def test_help_is_plain_text_without_pipecat_banner() -> None:
    for args in (["--help"], ["serve", "--help"], ["call", "--help"], ["demo", "--help"]):
        out = pipeswitch(*args)
        assert out.returncode == 0, out.stderr
        text = out.stdout + out.stderr
        assert "ᓚᘏᗢ" not in text and "Pipecat 1." not in text, args
        assert "``" not in text, args
    top = pipeswitch("--help").stdout
    for command in ("serve", "call", "demo", "bench"):
        assert command in top
    assert "(default: 8000)" in pipeswitch("call", "--help").stdout  # defaults are shown


def test_serve_path_imports_no_bench_module(tmp_path: Path) -> None:
    """Everything ``serve`` imports, up to a running start-up, without ``pipeswitch.bench``."""
    code = (
        "import sys\n"
        "from pipeswitch.pipelines.cli import main\n"
        # A voice file that is not there: serve imports its whole path, builds the app, and
        # stops at the start-up check before any model process starts.
        "rc = main(['serve', '--port', '0'])\n"
        "import pipeswitch.pipelines.app, pipeswitch.pipelines.workers, pipeswitch.pipelines.session\n"
        "bench = sorted(m for m in sys.modules if m.startswith('pipeswitch.bench'))\n"
        "print('RC', rc, 'BENCH', bench, 'APP', 'pipeswitch.pipelines.app' in sys.modules)\n"
    )
    env = {"PIPESWITCH_PIPER_VOICE": str(tmp_path / "missing.onnx")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, **env},
    )
    assert "RC 2 BENCH [] APP True" in out.stdout, out.stdout + out.stderr
    assert "PIPESWITCH_PIPER_VOICE=" in out.stderr  # it got as far as the app's own checks


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[[tenants]\nname = "x"\n', "line 1, column 10: invalid TOML"),
        (
            '[[tenants]]\nname = "x.example"\nvoise = "amy"\n',
            "line 3: tenants[0] (x.example): voise: unknown key",
        ),
        ("", "the file is empty"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    out = pipeswitch("serve", "--config", str(path), "--port", "0")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"pipeswitch serve: {path}: {expect}"), out.stderr


def test_bad_setting_is_one_line_naming_the_variable() -> None:
    out = pipeswitch("serve", env={"PIPESWITCH_DRAIN_TIMEOUT_SECS": "soon"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PIPESWITCH_DRAIN_TIMEOUT_SECS" in lines[0], out.stderr


def test_real_providers_with_a_key_missing_exit_2_naming_it() -> None:
    out = pipeswitch(
        "serve",
        "--providers",
        "real",
        "--port",
        "0",
        env={"PIPESWITCH_DEEPGRAM_API_KEY": DG_KEY, "PIPESWITCH_GROQ_API_KEY": ""},
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PIPESWITCH_GROQ_API_KEY is not set" in lines[0], out.stderr
    assert DG_KEY not in out.stderr


def test_settings_repr_and_tracebacks_show_no_secret_values(tmp_path: Path) -> None:
    """The production sink prints no variable values: a key in a local stays out of the log."""
    code = (
        "from loguru import logger\n"
        "from pipeswitch.config.logging import configure_logging\n"
        "from pipeswitch.config.settings import Settings\n"
        "configure_logging('INFO')\n"
        f"settings = Settings(deepgram_api_key={DG_KEY!r})\n"
        "logger.info('settings: {!r}', settings)\n"
        "def send(url: str, token: str) -> None:\n"
        "    raise ConnectionError('provider refused')\n"
        "def connect(api_key: str, settings: Settings) -> None:\n"
        "    send(settings.deepgram_url, 'Token ' + api_key)\n"
        "try:\n"
        "    connect(settings.deepgram_api_key.get_secret_value(), settings)\n"
        "except ConnectionError:\n"
        "    logger.exception('call failed')\n"
    )
    # A file, not -c: loguru annotates values only where it can read the source.
    script = tmp_path / "fail.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert "Traceback" in out.stderr and "provider refused" in out.stderr, out.stderr
    assert DG_KEY not in out.stderr and DG_KEY[:8] not in out.stderr, out.stderr


@pytest.mark.asyncio(loop_scope="session")
async def test_failing_real_call_logs_no_key(tmp_path: Path) -> None:
    """--providers real with planted keys; the Deepgram SDK fails on the call (logged, and
    the caller hears an apology); neither key (nor its first characters) is anywhere in the
    log. The traceback case is the test above."""
    port = free_port()
    server = ServeProcess(
        port,
        tmp_path / "serve.log",
        "--providers",
        "real",
        "--log-level",
        "DEBUG",
        env={
            "PIPESWITCH_DEEPGRAM_API_KEY": DG_KEY,
            "PIPESWITCH_GROQ_API_KEY": GROQ_KEY,
            # A URL the SDK cannot parse: the call fails at once, with a traceback.
            "PIPESWITCH_DEEPGRAM_URL": "ws://[unparsable",
            "PIPESWITCH_GROQ_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        },
    )
    try:
        await asyncio.to_thread(server.wait_ready)
        stream = FakeSwitchStream(
            StreamConfig(
                url=f"ws://127.0.0.1:{port}/fs/secret-call?domain=default&rate=8000",
                rate=8000,
                playback="voxcom",
            )
        )
        await stream.start()
        assert await stream.wait_connected(5.0)
        deadline = time.monotonic() + 15
        while stream.close_record.server_close_code is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await stream.aclose()
        log = server.log()
        assert "secret-call" in log and "DeepgramSTTService" in log and "ERROR" in log, log[-3000:]
        for key in (DG_KEY, GROQ_KEY):
            assert key[:8] not in log, f"{key[:8]}… in the log"
    finally:
        server.close()


def test_bench_without_the_bench_extra_says_what_is_missing() -> None:
    """A [local]-only install has no psutil; ``pipeswitch bench`` says so and exits 2."""
    code = (
        "import sys\n"
        "sys.modules['psutil'] = None  # as if not installed: importing it raises\n"
        "from pipeswitch.pipelines.cli import main\n"
        "sys.exit(main(['bench', 'latency', '--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "needs 'psutil'" in out.stderr and "pipeswitch[bench]" in out.stderr
    assert "Traceback" not in out.stderr
