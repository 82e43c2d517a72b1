"""Secrets: which values are secret, and masking every form of them wherever they could land.

A value is secret when its key looks secret (``is_secret_key``) or when it is registered as one
(``Redactor.add``: the operator registers the values Airflow's own masker knows, such as a
templated Variable or Connection field under a neutral key like ``DB``).

A secret rarely reaches a sink exactly as it was given: a private key is printed one line at a
time, ``repr`` and exception messages escape its quotes and backslashes, ``json.dumps`` (and
every JSON record we write) escapes newlines and non-ASCII characters, a URL percent-encodes
it. ``Redactor`` therefore masks each of those forms, of the whole value and of each of its
lines, with one compiled regular expression however many secrets there are.

This is our own guarantee, independent of Airflow's masker (which only knows exact values and
a fixed list of key names). No Airflow import: the runtime masks inside the pod too.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

MASK = "***"
#: Shorter values (after stripping blanks) are not treated as secrets: masking ``"1"`` or
#: ``"on"`` would garble every message and protect nothing. Longer than MASK on purpose, so
#: every masking step shortens the text (see ``Redactor.redact``).
MIN_SECRET_LENGTH = 4
_SECRET_KEY = re.compile(r"password|passwd|passphrase|token|secret|key|credential|private|auth", re.IGNORECASE)
_NOT_SECRET = frozenset({"true", "false", "none", "null", "yes"})
_PERCENT_ESCAPE = re.compile(r"%([0-9A-F])([0-9A-F])")


def is_secret_key(name: str) -> bool:
    """Keys that look secret (``*password*``, ``*token*``, ``*key*``, ...) have their values masked everywhere."""
    return bool(_SECRET_KEY.search(name))


def is_secret_value(value: str) -> bool:
    """Whether ``value`` (or one line of a secret) is worth masking: long and uncommon enough to be one."""
    text = value.strip()
    return len(text) >= MIN_SECRET_LENGTH and text.lower() not in _NOT_SECRET and bool(text.strip(MASK[0]))


#: Names (comma-separated, never values) of further ``env`` keys whose values are secret: the
#: worker sets it for the keys whose values Airflow's masker knows (a Connection field under
#: ``DB``), so the runtime, which cannot ask Airflow, masks them too.
SECRET_KEYS_ENV = "AICENTER_MASKED_ENV"  # its own name must not look secret


def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values worth masking of secret-looking keys and of the keys ``env`` names in SECRET_KEYS_ENV, longest first."""
    named = {k.strip() for k in str(env.get(SECRET_KEYS_ENV) or "").split(",") if k.strip()}
    values = {
        str(v) for k, v in env.items()
        if (is_secret_key(k) or k in named) and v is not None and is_secret_value(str(v))
    }
    return tuple(sorted(values, key=len, reverse=True))


def masked_env(env: Mapping[str, Any], redactor: Redactor | None = None) -> dict[str, str]:
    """``env`` as we may write it: secret-looking keys' values are MASK, registered secrets inside other values too."""
    return {
        k: MASK if is_secret_key(k) else (redactor.redact(str(v)) if redactor else str(v)) for k, v in env.items()
    }


def forms(value: str) -> set[str]:
    """Every form in which ``value`` can be printed: itself and each of its lines, each escaped as JSON,
    ``repr`` (either quote style) and in URLs. Lines too short or common to be secret are left out.
    """
    pieces = {value} | {line for line in value.splitlines() if is_secret_value(line)}
    found: set[str] = set()
    for piece in pieces:
        single = repr('"' + piece)[2:-1]  # a str holding both quotes is always written in single quotes
        double = single.replace("\\'", "'")  # as repr writes it between double quotes
        found |= {
            piece,
            json.dumps(piece)[1:-1],
            json.dumps(piece, ensure_ascii=False)[1:-1],
            single,
            double,
            double.replace('"', '\\"'),  # a double-quoted literal with its quotes escaped (JSON-like, shells)
            urllib.parse.quote(piece, safe="", errors="surrogatepass"),
            urllib.parse.quote(piece, safe="/", errors="surrogatepass"),
            urllib.parse.quote_plus(piece, safe="", errors="surrogatepass"),
        }
    return found


def _matchable(found: Iterable[str]) -> set[str]:
    """The literal strings to search for: each form, and URL forms with lower-case percent-escapes too."""
    words = set(found)
    words |= {_PERCENT_ESCAPE.sub(lambda m: m.group(0).lower(), w) for w in words if "%" in w}
    return words


def _alternation(words: Iterable[str]) -> str:
    """One pattern matching the longest of ``words`` at a position: a trie of them, so the cost per
    character is a branch on the next character rather than a try of every word (4x faster than a
    flat alternation of the 312 forms of 100 secrets on a clean 1 MB log).
    """
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        out = ""
        while True:  # a chain without branches is one literal (no nesting, no recursion)
            keys = sorted(k for k in node if k)
            if len(keys) == 1 and "" not in node:
                out += re.escape(keys[0])
                node = node[keys[0]]
                continue
            if not keys:
                return out
            # Greedy: a longer word is tried first, the shorter one ending here is the fallback.
            alternatives = "|".join(re.escape(k) + build(node[k]) for k in keys)
            return f"{out}(?:{alternatives}){'?' if '' in node else ''}"

    return build(trie)


#: Up to this many forms, :meth:`Redactor.found_in` searches for each; beyond, for the alternation
#: (on 7 MB of clean text: 100 forms, 0.19 s one by one and 0.76 s by the alternation).
FEW_FORMS = 256


class Redactor:
    """Masks every form of a set of secret values in text, records and log streams.

    All forms of all secrets are one compiled alternation (a trie: the longest form at each
    position wins), rebuilt once per change of the set. Where forms overlap (one secret's line
    inside another's JSON form) the union of all their occurrences is masked, so no fragment of
    a longer form survives a shorter match.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._compiled: tuple[re.Pattern[str], bool] | None = None
        self._longest = 0
        self._words: tuple[str, ...] = ()
        for value in values:
            self.add(value)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Redactor:
        """A redactor for the values of ``env``'s secret-looking keys."""
        return cls(secret_values(env))

    def add(self, value: str) -> None:
        """Register ``value`` (and so all its forms) as secret; values too short or common are ignored."""
        value = str(value)
        if not is_secret_value(value) or value in self._values:
            return
        with self._lock:
            self._values.add(value)
            self._compiled = None

    @property
    def values(self) -> tuple[str, ...]:
        """The registered secrets, longest first."""
        return tuple(sorted(self._values, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:  # never the values
        return f"Redactor({len(self._values)} secrets)"

    def _patterns(self) -> tuple[re.Pattern[str], bool] | None:
        with self._lock:
            if self._compiled is None and self._values:
                every = _matchable(set().union(*(forms(v) for v in self._values)))
                self._longest = max(map(len, every))
                self._words = tuple(sorted(every, key=len, reverse=True))
                try:
                    alternation = _alternation(every)
                    re.compile(alternation)
                except (RecursionError, re.error):  # pathologically nested prefixes: the flat form, longest first
                    alternation = "|".join(re.escape(w) for w in sorted(every, key=len, reverse=True))
                # With it: whether masking can make a new occurrence (a form holding MASK's character).
                self._compiled = (re.compile(alternation), any(MASK[0] in f for f in every))
            return self._compiled

    def found_in(self, text: str) -> bool:
        """Whether any form of any secret occurs in ``text``.

        One substring search per form while there are few (``str.find`` skips through clean text
        far faster than the alternation steps through it: 7 MB of prediction outputs with 3
        secrets, 0.2 s by the alternation), else one search of the alternation.
        """
        compiled = self._patterns()
        if compiled is None:
            return False
        if len(self._words) <= FEW_FORMS:
            return any(word in text for word in self._words)
        return compiled[0].search(text) is not None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The merged ``(start, end)`` ranges of ``text`` covered by any form of any secret."""
        compiled = self._patterns()
        if compiled is None:
            return []
        pattern = compiled[0]
        merged: list[list[int]] = []
        # The leftmost-longest matches come fast; a form that starts inside one of them and ends
        # beyond it (one secret's line inside another's JSON form) is found by trying each position.
        for match in pattern.finditer(text):
            start, end = match.span()
            for position in range(start + 1, match.end()):
                inner = pattern.match(text, position)  # the longest form starting there
                if inner is not None:
                    end = max(end, inner.end())
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(s, e) for s, e in merged]

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of every form of every secret replaced by MASK."""
        while True:
            spans = self.spans(text)
            if not spans:
                return text
            parts: list[str] = []
            last = 0
            for start, end in spans:
                parts += [text[last:start], MASK]
                last = end
            parts.append(text[last:])
            text = "".join(parts)
            compiled = self._compiled
            # Masking can only create a new occurrence across a MASK if some form contains its
            # character; every pass shortens the text (forms are longer than MASK), so this ends.
            if compiled is None or not compiled[1]:
                return text

    def redact_data(self, data: Any) -> Any:
        """A JSON-like structure (XCom value, results, rendered fields) with every string in it redacted."""
        if isinstance(data, str):
            return self.redact(data)
        if isinstance(data, Mapping):
            return {self.redact_data(k): self.redact_data(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.redact_data(v) for v in data]
        if isinstance(data, tuple):
            return tuple(self.redact_data(v) for v in data)
        return data

    def lines(self, lines: Iterable[str]) -> Iterator[str]:
        """Each line of a log stream, redacted (a multi-line secret is masked line by line)."""
        for line in lines:
            yield self.redact(line)

    @property
    def longest_form(self) -> int:
        """The length of the longest form of any secret (0 without secrets)."""
        self._patterns()
        return self._longest if self._values else 0

    def cut_point(self, text: str) -> int:
        """Where ``text`` may be cut so that no form of a secret straddles the cut.

        A secret whose start is kept and whose end is not could not be recognised on either side, so
        the cut comes before the last ``longest_form`` characters (a secret starting there may end
        past the text) and before a secret crossing that point.
        """
        cut = max(0, len(text) - self.longest_form)
        for start, end in self.spans(text):
            if start < cut < end:
                return start
        return cut


def capped_lines(readline: Callable[[int], bytes], redactor: Redactor, limit: int) -> Iterator[str]:
    """The lines of a pipe (without their ``\\n``), decoded, every form of a secret masked, each at most ``limit`` bytes.

    ``readline(limit)`` (a binary pipe's) reads them, so memory stays bounded whatever the stream
    holds: an over-long line keeps its head, cut where no secret straddles the cut
    (``Redactor.cut_point``) and marked ``[... line cut at N KiB]``; the rest of it is read and dropped.
    The one line capper of the product: the local launcher's log and the supervisor's user output.
    """
    cutting = False
    while chunk := readline(limit):
        complete = chunk.endswith(b"\n") or len(chunk) < limit  # short and no newline: the last line
        if not cutting:
            text = chunk.decode("utf-8", "replace").rstrip("\n")
            if complete:
                yield redactor.redact(text)
            else:
                yield f"{redactor.redact(text[:redactor.cut_point(text)])} [... line cut at {limit // 1024} KiB]"
        cutting = not complete


@lru_cache(maxsize=64)
def _redactor_for(values: tuple[str, ...]) -> Redactor:
    return Redactor(values)


def redact(text: str, secrets: Redactor | Iterable[str]) -> str:
    """``text`` with every form of ``secrets`` masked (a Redactor, or secret values as ``secret_values`` gives them)."""
    redactor = secrets if isinstance(secrets, Redactor) else _redactor_for(tuple(secrets))
    return redactor.redact(text)


#: Lines of a JSON Lines file longer than this are masked as text in bounded pieces, not parsed.
JSON_LINE_LIMIT = 16 << 20
#: Lines of a JSON Lines file searched at once for secrets (see :func:`_redact_json_lines`), in bytes.
JSON_BLOCK = 1 << 20


def _redact_json_line(line: str, redactor: Redactor) -> str:
    """One JSON line with every string in it (keys too) masked, then the text itself.

    Masking the decoded strings finds what the text alone cannot: a secret's ``repr`` inside an
    exception message that ``json.dumps`` escaped once more (``'a\\nb'`` as ``'a\\\\nb'``).
    A line that is not JSON is masked as text, and so is one without a backslash (the fast path:
    without escapes its strings decode to themselves, so the text holds every form they hold).
    """
    if "\\" not in line:
        return redactor.redact(line)
    try:
        data = json.loads(line)
    except ValueError:
        return redactor.redact(line)
    masked = redactor.redact_data(data)
    return redactor.redact(json.dumps(masked) if masked != data else line)


def _redact_long_line(first: bytes, source: IO[bytes], sink: IO[bytes], redactor: Redactor, limit: int) -> None:
    """The rest of a line longer than ``limit``, masked as text in pieces (bounded memory): each piece
    ends where no secret straddles it (``Redactor.cut_point``), what follows is carried to the next.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending, chunk = "", first
    while chunk:
        pending += decoder.decode(chunk)
        if pending.endswith("\n"):
            sink.write((redactor.redact(pending[:-1]) + "\n").encode())
            return
        cut = redactor.cut_point(pending)
        sink.write(redactor.redact(pending[:cut]).encode())
        pending = pending[cut:]
        chunk = source.readline(limit)
    sink.write(redactor.redact(pending + decoder.decode(b"", final=True)).encode())


def _redact_json_lines(lines: list[bytes], sink: IO[bytes], redactor: Redactor) -> bool:
    """Whole lines, masked into ``sink``; whether any changed.

    One search of the whole block first: where no form of a secret is in it, none is in any of
    its lines, and a line without a backslash (nothing its JSON strings could decode to that the
    text does not show) is written as it is. The other lines, and every line of a block where a
    form was found, go through :func:`_redact_json_line`, one by one.
    """
    if not lines:
        return False
    joined = b"".join(lines)
    clean = not redactor.found_in(joined.decode("utf-8", "replace"))
    if clean and b"\\" not in joined:
        sink.write(joined)
        return False
    changed = False
    for raw in lines:
        if clean and b"\\" not in raw:
            sink.write(raw)
            continue
        text = raw.decode("utf-8", "replace")
        body = text.rstrip("\r\n")
        masked = _redact_json_line(body, redactor)
        if masked != body:
            changed = True
            raw = (masked + text[len(body):]).encode()
        sink.write(raw)
    return changed


def redact_json_lines_file(path: Path, redactor: Redactor, *, limit: int = JSON_LINE_LIMIT) -> bool:
    """Mask every form of every secret in a JSON Lines file (batch prediction's outputs and errors), in place.

    Streams line by line (memory bounded by ``limit``); the file is replaced only when something
    was masked (a temporary beside it, renamed over it). Returns whether it changed.
    """
    if not redactor:
        return False
    tmp = path.with_name(f".{path.name}.masking")
    changed = False
    try:
        with open(path, "rb") as source, open(tmp, "wb") as sink:
            block: list[bytes] = []
            size = 0
            while True:
                raw = source.readline(limit)
                long = len(raw) >= limit and not raw.endswith(b"\n")
                if raw and not long:
                    block.append(raw)
                    size += len(raw)
                    if size < JSON_BLOCK:
                        continue
                changed = _redact_json_lines(block, sink, redactor) or changed
                block, size = [], 0
                if long:
                    changed = True  # cannot compare cheaply: written anew either way
                    _redact_long_line(raw, source, sink, redactor, limit)
                elif not raw:
                    break
        if changed:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return changed
