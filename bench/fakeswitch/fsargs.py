"""FreeSWITCH API argument splitting (``switch_separate_string`` with ``' '``).

Why: ``uuid_audio_stream <uuid> send_text <text>`` only sends ``argv[2]``, so
text reaching the server is cut at the first unquoted space, loses paired
single quotes and has its backslash escapes decoded (protocol doc §2.2). The
emulator reproduces that so tests see what a real FreeSWITCH would send.
"""

from __future__ import annotations

__all__ = ["api_text_argument", "separate_string"]

_ESC = "\\"
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "s": " "}


def _cleanup(token: str) -> str:
    """``cleanup_separated_string(str, 0)``: strip quotes and spaces, decode escapes."""
    i = 0
    n = len(token)
    while i < n and token[i] == " ":
        i += 1
    out: list[str] = []
    end: int | None = None
    inside = False
    while i < n:
        c = token[i]
        escaped = False
        if c == _ESC:
            e = token[i + 1] if i + 1 < n else "\0"
            if e in ("'", '"', _ESC) or e in _UNESCAPE:
                i += 1
                out.append(_UNESCAPE.get(e, e))
                end = len(out)
                escaped = True
        if not escaped:
            if c == "'" and (inside or "'" in token[i + 1 :]):
                inside = not inside
                if inside:
                    end = len(out)
            else:
                out.append(c)
                if c != " " or inside:
                    end = len(out)
        i += 1
    return "".join(out[:end]) if end is not None else ""


def separate_string(cmd: str, arraylen: int) -> list[str]:
    """``separate_string_blank_delim``: the last slot takes the rest of the line."""
    chars = list(cmd)
    n = len(chars)
    starts: list[int] = []
    cuts: set[int] = set()
    state = 0  # 0 START, 1 SKIP_INITIAL_SPACE, 2 FIND_DELIM, 3 SKIP_ENDING_SPACE
    inside = False
    i = 0
    while i < n and len(starts) < arraylen:
        c = chars[i]
        if state == 0:
            starts.append(i)
            state = 1
        elif state == 1:
            if c == " ":
                i += 1
            else:
                state = 2
        elif state == 2:
            if c == _ESC:
                i += 1  # the escaped character is skipped, whatever it is
            elif c == "'":
                inside = not inside
            elif c == " " and not inside:
                cuts.add(i)
                state = 3
            i += 1
        else:
            if c == " ":
                i += 1
            else:
                state = 0
    tokens: list[str] = []
    for s in starts:
        e = s
        while e < n and e not in cuts:
            e += 1
        tokens.append(_cleanup(cmd[s:e]))
    return tokens


def api_text_argument(uuid: str, text: str, command: str = "send_text") -> str | None:
    """The text ``uuid_audio_stream <uuid> <command> <text>`` actually sends.

    None when FreeSWITCH would send nothing (no third token).
    """
    argv = separate_string(f"{uuid} {command} {text}", 6)
    return argv[2] if len(argv) > 2 else None
