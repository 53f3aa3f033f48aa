"""Network-off start-up, offline environment, loopback-only listeners, per-child threads."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from pipeswitch.pipelines.local.supervisor import LocalModelServers

pytestmark = [pytest.mark.local_models, pytest.mark.asyncio(loop_scope="session")]

REPO_ROOT = Path(__file__).resolve().parents[2]
LINUX = sys.platform.startswith("linux")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _is_loopback_hex(addr: str) -> bool:
    ip = addr.split(":")[0]
    if len(ip) == 8:  # IPv4, little-endian
        return ip.endswith("7F")  # 127.x.x.x
    return ip in (
        "00000000000000000000000001000000",  # ::1
    ) or (ip.startswith("0000000000000000FFFF0000") and ip.endswith("7F"))


def _inet_sockets(pid: int) -> list[tuple[str, str, str, str]]:
    """(proto, local, remote, state) of the process's TCP/UDP sockets."""
    inodes = _socket_inodes(pid)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes:
                found.append((proto, cols[1], cols[2], cols[3]))
    return found


@pytest.mark.skipif(not LINUX, reason="reads /proc")
async def test_children_env_offline_and_threads(local_servers: LocalModelServers) -> None:
    expected_threads = {"piper": "1", "whisper": "2", "llm": "1"}
    for name, child in local_servers.children.items():
        assert child.pid is not None
        env = _environ(child.pid)
        assert env.get("HF_HUB_OFFLINE") == "1", name
        assert env.get("TRANSFORMERS_OFFLINE") == "1", name
        assert env.get("HF_DATASETS_OFFLINE") == "1", name
        assert env.get("OMP_NUM_THREADS") == expected_threads[name], name
        # Piper has no key; the others get it through the environment, never argv.
        assert ("PIPESWITCH_LOCAL_API_KEY" in env) == (name != "piper"), name
        assert local_servers.api_key.encode() not in _cmdline(child.pid)


@pytest.mark.skipif(not LINUX, reason="reads /proc")
async def test_children_listen_on_loopback_only(local_servers: LocalModelServers) -> None:
    listen_counts = {}
    for name, child in local_servers.children.items():
        assert child.pid is not None
        sockets = _inet_sockets(child.pid)
        for proto, local, remote, _state in sockets:
            assert _is_loopback_hex(local), f"{name}: {proto} socket bound to {local}"
            if not remote.startswith("00000000:0000") and set(remote.split(":")[0]) != {"0"}:
                assert _is_loopback_hex(remote), f"{name}: {proto} connected to {remote}"
        listen_counts[name] = sum(
            1 for p, _, _, st in sockets if p.startswith("tcp") and st == "0A"
        )
    # The LLM process also has xllamacpp's embedded llama.cpp listener (key-locked, loopback).
    assert listen_counts["piper"] == 1 and listen_counts["whisper"] == 1
    assert 1 <= listen_counts["llm"] <= 2, listen_counts


def _netns_prefix() -> list[str] | None:
    """A command prefix that runs without network access (only loopback), if possible."""
    if not LINUX or shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        probe = os.system(" ".join(prefix) + " true >/dev/null 2>&1")
        if probe == 0:
            return prefix
    return None


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, errno, os, socket, subprocess, sys
    import aiohttp
    # Bring loopback up inside the fresh network namespace.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    s = socket.socket(); s.settimeout(2)
    rc = s.connect_ex(("1.1.1.1", 443))
    assert rc != 0, "network is reachable; expected none"
    os.environ.pop("HF_HUB_OFFLINE", None)  # the supervisor must set it for the children
    from pipeswitch.pipelines.local.supervisor import LocalModelServers

    async def main():
        async with LocalModelServers(start_timeout=180) as servers:
            async with aiohttp.ClientSession() as session:
                async with session.post(servers.piper_url(8000), json={"text": "Hello."}) as r:
                    assert r.status == 200 and len(await r.read()) > 1000
                headers = {"Authorization": f"Bearer {servers.api_key}"}
                body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 2}
                async with session.post(servers.llm_base_url + "/chat/completions",
                                        json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
            health = await servers.health()
            assert all(h["ok"] for h in health.values()), health
        print("OFFLINE-OK")

    asyncio.run(main())
    """
)


async def test_servers_start_without_network() -> None:
    prefix = _netns_prefix()
    if prefix is None:
        pytest.skip("cannot create a network namespace here (unshare -n / -rn)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' not available to bring up loopback")
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-c",
        OFFLINE_SCRIPT,
        cwd=str(REPO_ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode == 0 and b"OFFLINE-OK" in stdout, stderr.decode()[-3000:]
