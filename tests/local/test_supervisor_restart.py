"""A model server that dies is brought back by the supervisor, on the same port."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from pipeswitch.pipelines.local.supervisor import LocalModelServers
from pipeswitch.pipelines.piper_client import synthesize

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_killed_piper_comes_back_on_its_port() -> None:
    async with (
        LocalModelServers.piper_only(log_level="WARNING") as servers,
        aiohttp.ClientSession() as http,
    ):
        piper = servers.children["piper"]
        port, pid = piper.port, piper.pid
        assert pid is not None
        url = servers.piper_url(8000)
        pcm, _ = await synthesize(http, url, "Before the crash.")
        assert pcm
        os.kill(pid, signal.SIGKILL)
        pcm = b""
        for _ in range(300):  # until the new process answers on the old URL
            try:
                pcm, _ = await synthesize(http, url, "After the crash.")
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        assert pcm, "Piper did not come back"
        assert piper.alive and piper.pid != pid and piper.restarts == 1
        assert piper.port == port  # the URL every call was given still works
    assert not piper.alive  # stopping the supervisor does not bring it back again
