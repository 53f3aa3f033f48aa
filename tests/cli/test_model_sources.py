"""Your own local models: a path is used as is, a hub id only when downloads are allowed,
and anything unusable stops start-up with one line naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeswitch.pipelines.local.models import ModelSourceError, resolve_model_sources
from tests.cli.server_proc import free_port, pipeswitch


def test_empty_settings_keep_the_embedded_defaults() -> None:
    assert resolve_model_sources() == resolve_model_sources(llm="", stt=" ", piper="")
    src = resolve_model_sources()
    assert src.llm is None and src.stt is None and src.piper is None


def test_local_paths_are_checked_and_used(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    whisper = tmp_path / "whisper-ct2"
    whisper.mkdir()
    (whisper / "model.bin").write_bytes(b"x")
    voice = tmp_path / "en_GB-mine-medium.onnx"
    voice.write_bytes(b"x")
    (tmp_path / "en_GB-mine-medium.onnx.json").write_text("{}")
    src = resolve_model_sources(llm=str(gguf), stt=str(whisper), piper=str(voice))
    assert (src.llm, src.stt, src.piper) == (gguf, whisper, voice)


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        (
            {"llm": "/nowhere/model.gguf"},
            "PIPESWITCH_LOCAL_LLM_MODEL=/nowhere/model.gguf: no such file",
        ),
        (
            {"llm": "Qwen/Qwen2.5-0.5B-Instruct-GGUF/q4.gguf"},
            "PIPESWITCH_ALLOW_MODEL_DOWNLOAD=true",
        ),
        ({"stt": "Systran/faster-whisper-base.en"}, "PIPESWITCH_ALLOW_MODEL_DOWNLOAD=true"),
        ({"piper": "rhasspy/piper-voices/en/amy.onnx"}, "PIPESWITCH_ALLOW_MODEL_DOWNLOAD=true"),
    ],
)
def test_unusable_sources_are_one_line(kwargs: dict[str, str], expect: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        resolve_model_sources(**kwargs)  # type: ignore[arg-type]
    assert expect in str(info.value) and "\n" not in str(info.value)


def test_incomplete_local_models_are_refused(tmp_path: Path) -> None:
    voice = tmp_path / "voice.onnx"
    voice.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"voice\.onnx\.json must sit next to it"):
        resolve_model_sources(piper=str(voice))
    with pytest.raises(ModelSourceError, match="no model.bin"):
        resolve_model_sources(stt=str(tmp_path))


def test_allowed_download_without_network_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hub is unreachable here (a closed loopback port stands in for no network).
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelSourceError) as info:
        resolve_model_sources(llm="owner/repo/model.gguf", allow_download=True)
    msg = str(info.value)
    assert msg.startswith("PIPESWITCH_LOCAL_LLM_MODEL=owner/repo/model.gguf: hub download failed")
    assert "\n" not in msg


def test_serve_stops_with_one_line_for_a_missing_model_file(tmp_path: Path) -> None:
    out = pipeswitch(
        "serve",
        "--port",
        "0",
        env={"PIPESWITCH_LOCAL_LLM_MODEL": str(tmp_path / "missing.gguf")},
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PIPESWITCH_LOCAL_LLM_MODEL=" in lines[0], out.stderr
