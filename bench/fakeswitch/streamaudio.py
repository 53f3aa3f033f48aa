"""mod_audio_stream's handling of server TEXT messages (``processMessage``).

Why a faithful port: what becomes a ``::play`` event, a temp file, or a
``::json`` event depends on cJSON and base64 quirks (case-insensitive keys,
trailing garbage accepted after the JSON value, ``valueint`` truncation,
lenient base64 padding). The server is tested against those, not against a
tidier reading of the protocol (doc §5.1).
"""

from __future__ import annotations

import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CJObject",
    "ProcessResult",
    "base64_decode",
    "cjson_dumps",
    "cjson_parse",
    "process_message",
]

RAW_RATE_EXTENSIONS = {
    8000: ".r8",
    16000: ".r16",
    24000: ".r24",
    32000: ".r32",
    48000: ".r48",
    64000: ".r64",
}
OTHER_EXTENSIONS = {"wav": ".wav", "mp3": ".mp3", "ogg": ".ogg", "pcmu": ".pcmu", "pcma": ".pcma"}
_INT_MAX = 2**31 - 1
_INT_MIN = -(2**31)


class CJObject(list[tuple[str, Any]]):
    """A JSON object as cJSON keeps it: ordered pairs, duplicates kept."""

    def find(self, name: str) -> int:
        """Index of the first key equal to ``name`` ignoring ASCII case (cJSON_GetObjectItem)."""
        want = name.encode("utf-8").lower()
        for i, (k, _) in enumerate(self):
            if k.encode("utf-8").lower() == want:
                return i
        return -1

    def get_item(self, name: str) -> Any:
        """cJSON_GetObjectItem; ``_MISSING`` when absent."""
        i = self.find(name)
        return self[i][1] if i >= 0 else _MISSING

    def detach(self, name: str) -> Any:
        """cJSON_DetachItemFromObject; ``_MISSING`` when absent."""
        i = self.find(name)
        return self.pop(i)[1] if i >= 0 else _MISSING


class _Missing:
    __slots__ = ()


_MISSING: Any = _Missing()


def _no_constants(name: str) -> Any:
    raise ValueError(f"cJSON does not accept {name}")


_decoder = json.JSONDecoder(object_pairs_hook=CJObject, parse_constant=_no_constants)


def cjson_parse(text: str) -> Any:
    """cJSON_Parse on a C string: stops at NUL, skips leading bytes ≤ 32, ignores trailing data.

    Returns ``_MISSING`` on a parse failure.
    """
    s = text.split("\0", 1)[0]
    i = 0
    while i < len(s) and ord(s[i]) <= 32:
        i += 1
    try:
        value, _ = _decoder.raw_decode(s, i)
    except ValueError:
        return _MISSING
    return value


def _cjson_number(v: float | int) -> str:
    d = float(v)
    if math.isnan(d) or math.isinf(d):
        return "null"
    vi = _INT_MAX if d >= _INT_MAX else _INT_MIN if d <= _INT_MIN else int(d)
    if d == vi:
        return str(vi)
    s = f"{d:1.15g}"
    if float(s) != d:
        s = f"{d:1.17g}"
    return s


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _cjson_string(s: str) -> str:
    out = []
    for ch in s:
        e = _ESCAPES.get(ch)
        if e is not None:
            out.append(e)
        elif ord(ch) < 32:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def cjson_dumps(value: Any) -> str:
    """cJSON_PrintUnformatted: compact, UTF-8 kept, integral doubles without ``.0``."""
    if isinstance(value, CJObject):
        return "{" + ",".join(f"{_cjson_string(k)}:{cjson_dumps(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(cjson_dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return _cjson_string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return _cjson_number(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


_B64_STRICT = re.compile(r"[A-Za-z0-9+/\-_]*[=.]{0,2}")
_URLSAFE = str.maketrans("-_", "+/")


def _pos_of_char(c: str) -> int:
    o = ord(c)
    if 65 <= o <= 90:
        return o - 65
    if 97 <= o <= 122:
        return o - 71
    if 48 <= o <= 57:
        return o + 4
    if c in "+-":
        return 62
    if c in "/_":
        return 63
    raise ValueError("Input is not valid base64-encoded data.")


def _base64_slow(s: str) -> bytes:
    """Line-by-line port of René Nyffenegger's ``decode`` (MAS base64.cpp)."""
    out = bytearray()
    n = len(s)
    pos = 0
    while pos < n:
        if pos + 1 >= n:
            raise ValueError("basic_string::at")  # std::out_of_range
        p1 = _pos_of_char(s[pos + 1])
        out.append(((_pos_of_char(s[pos]) << 2) + ((p1 & 0x30) >> 4)) & 0xFF)
        if pos + 2 < n and s[pos + 2] not in "=.":
            p2 = _pos_of_char(s[pos + 2])
            out.append((((p1 & 0x0F) << 4) + ((p2 & 0x3C) >> 2)) & 0xFF)
            if pos + 3 < n and s[pos + 3] not in "=.":
                out.append((((p2 & 0x03) << 6) + _pos_of_char(s[pos + 3])) & 0xFF)
        pos += 4
    return bytes(out)


def base64_decode(s: str) -> bytes:
    """MAS ``base64_decode``: accepts url-safe chars and missing padding; raises ValueError.

    Fast path (binascii) for the common well-formed case; the exact port otherwise.
    """
    n = len(s)
    if n == 0:
        return b""
    if n % 4 != 1 and _B64_STRICT.fullmatch(s):
        core = s.rstrip("=.").translate(_URLSAFE)
        if len(core) % 4 != 1:
            return binascii.a2b_base64(core + "=" * (-len(core) % 4))
    return _base64_slow(s)


@dataclass(slots=True)
class ProcessResult:
    """Outcome of ``processMessage`` for one server TEXT message.

    ``ok``: a valid streamAudio (→ file + ``::play``, or voxcom raw injection).
    ``json_type``: the ``type`` string if any (``clearAudio`` matters to cloudfieldcz).
    ``data``: the ``data`` object without ``audioData`` (file not yet added).
    """

    ok: bool = False
    json_type: str | None = None
    audio_type: str = ""
    sample_rate: int = 0
    extension: str = ""
    audio: bytes = b""
    data: CJObject | None = None
    errors: list[str] = field(default_factory=list)

    def play_body(self, path: str) -> str:
        """The ``::play`` event body: data minus audioData plus ``"file"``."""
        assert self.data is not None
        data = CJObject(self.data)
        data.append(("file", path))
        return cjson_dumps(data)


def _valueint(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return 0
    d = float(v)
    if math.isnan(d):
        return 0
    return _INT_MAX if d >= _INT_MAX else _INT_MIN if d <= _INT_MIN else int(d)


def process_message(text: str, *, raw_to_file: bool = True) -> ProcessResult:
    """Port of ``AudioStreamer::processMessage`` (community; voxcom with ``raw_to_file=False``).

    The errors are the strings the module logs (without the ``(<uuid>)`` prefix).
    """
    out = ProcessResult()
    root = cjson_parse(text)
    if not isinstance(root, CJObject):
        return out
    jtype = root.get_item("type")
    if not isinstance(jtype, str):
        return out
    out.json_type = jtype
    if jtype != "streamAudio":
        return out
    data = root.get_item("data")
    if data is _MISSING:
        out.errors.append("processMessage - no data in streamAudio")
        return out
    if not isinstance(data, CJObject):
        data = CJObject()  # cJSON finds no named children in non-objects
    adt = data.get_item("audioDataType")
    audio_type = adt if isinstance(adt, str) else ""
    audio = data.detach("audioData")
    if audio is _MISSING:
        out.errors.append("processMessage - streamAudio missing 'audioData' field")
        return out
    if not isinstance(audio, str):
        out.errors.append("processMessage - 'audioData' is not a string (expected base64 string)")
        return out
    sr = data.get_item("sampleRate")
    rate = 0 if sr is _MISSING else _valueint(sr)
    if audio_type == "raw":
        ext = RAW_RATE_EXTENSIONS.get(rate)
        if ext is None:
            out.errors.append(f"processMessage - unsupported sample rate: {rate}")
            return out
    elif audio_type in OTHER_EXTENSIONS:
        ext = OTHER_EXTENSIONS[audio_type]
    else:
        out.errors.append(f"processMessage - unsupported audio type: {audio_type}")
        return out
    try:
        decoded = base64_decode(audio)
    except ValueError as e:
        out.errors.append(f"processMessage - base64 decode error: {e}")
        return out
    out.ok = True
    out.audio_type = audio_type
    out.sample_rate = rate
    out.extension = "" if (audio_type == "raw" and not raw_to_file) else ext
    out.audio = decoded
    out.data = data
    return out
