"""Errors of the library that the command line words in its own terms.

The library states the plain fact and names its own parameter; only the CLI knows which flag
sets that parameter (`neumuter localize --lr`, `neighbors --top-k`, ...) and says so."""
from __future__ import annotations

import string
import unicodedata

from . import NeumuterError

#: characters that are never written raw to a terminal: every control character (C0, DEL, C1),
#: the line and paragraph separators, and the bidirectional overrides that reorder what is shown
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:             # a byte that is not UTF-8, kept by surrogateescape (paths)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI


def escape(text, keep_newlines: bool = False) -> str:
    """``text`` as it may reach a terminal: every control character shown as an escape (``\\n``,
    ``\\x1b``, ``\\u2028``), so that a record id, a text or a path can neither end the line nor
    move the cursor, clear the screen or retitle the terminal. Printable text, backslashes
    included, is kept as it is. ``keep_newlines``: the message's own line breaks stay (a table);
    user data in it must have been escaped when it was put in."""
    text = str(text)
    if not any(_unsafe(ch) for ch in text):
        return text
    return "".join(ch if (keep_newlines and ch == "\n") or not _unsafe(ch) else _shown(ch) for ch in text)


class SettingError(NeumuterError):
    """A setting cannot work: ``setting`` is the library's parameter name (``top_k``,
    ``layers``, ``device``, ...), ``problem`` what is wrong with its value."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting} {problem}")


class DeviceUnavailable(SettingError):
    """The device asked for does not exist on this machine."""

    def __init__(self, device: str, problem: str):
        self.device = device
        super().__init__("device", f"{device} asked for, but {problem}")


class SettingsMessage(NeumuterError):
    """An error whose message names settings: ``template`` is a ``str.format`` string whose
    fields are either one of ``values`` or the name of a library parameter (``"give
    {reference_path} or {thresholds_path}, not both"``). The library's own message names the
    parameters; the CLI words it with the flags that set them (:meth:`worded`)."""

    def __init__(self, template: str, /, **values):
        self.template, self.values = template, values
        self.settings = [field for _, field, _, _ in string.Formatter().parse(template)
                         if field and field not in values]
        super().__init__(self.worded(lambda setting: setting))

    def worded(self, name_of) -> str:
        """The message with each setting named by ``name_of(setting)``."""
        return self.template.format(**{setting: name_of(setting) for setting in self.settings}, **self.values)


class ConflictingSettings(SettingsMessage):
    """Settings that cannot work together (a usage error: exit status 2 on the command line)."""


class NonFiniteLoss(NeumuterError):
    """Training produced a NaN or infinite loss (a step too large, or a dtype too coarse)."""


class NonFiniteOutput(NeumuterError):
    """The model computed a NaN or infinite logit or loss on sequence ``index`` (0-based, in the
    order the sequences were given; at ``token``, 1-based, when known): its weights are broken,
    and no number it gives means anything. The caller names the record."""

    def __init__(self, index: int, token: int | None = None):
        self.index, self.token = index, token
        where = f" at token {token}" if token is not None else ""
        self.problem = (f"computes a non-finite logit or loss{where} (NaN or infinity): its weights are broken, "
                        "so no number it gives means anything")
        super().__init__(f"sequence {index + 1}: the model {self.problem}")


class FingerprintMismatch(SettingsMessage):
    """A file made for one model (its ``expected`` fingerprint) was given with another model
    (``found``)."""

    def __init__(self, expected: str | None, found: str, template: str, /, **values):
        self.expected, self.found = expected, found
        super().__init__(template, **values)


__all__ = ["escape", "NeumuterError", "SettingError", "DeviceUnavailable", "SettingsMessage", "ConflictingSettings",
           "NonFiniteLoss", "NonFiniteOutput", "FingerprintMismatch"]
