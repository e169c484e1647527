"""
Response languages for the LANG command (RFC 6856 section 3).

A :class:`Language` is a tag, its name in itself, and translations of the
human-readable texts of ``+OK`` and ``-ERR`` lines (English texts as keys,
``{field}`` placeholders kept).  Texts a language lacks stay English; lines
clients parse (STAT, LIST, UIDL, RETR sizes) are never translated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import field, frozen


@frozen
class Language:
    tag: str
    name: str
    texts: Mapping[str, str] = field(factory=dict)

    def text(self, template: str, **fields: object) -> str:
        """``template`` in this language, its fields filled in."""
        return self.texts.get(template, template).format(**fields)


ENGLISH = Language("en", "English")


class Languages:
    """The languages a server speaks; the first is the default (``LANG *``)."""

    def __init__(self, languages: Iterable[Language] = (ENGLISH,)) -> None:
        self.all = tuple(languages)
        if not self.all:
            raise ValueError("at least one language")
        self._by_tag = {language.tag.lower(): language for language in self.all}

    @property
    def default(self) -> Language:
        return self.all[0]

    def lookup(self, language_range: str) -> Language | None:
        """
        RFC 4647 section 3.4 lookup: ``*`` is the default; otherwise the
        range, then shorter and shorter prefixes of it (``de-CH-1996``,
        ``de-CH``, ``de``), the first tag the server has.
        """
        if language_range == "*":
            return self.default
        parts = language_range.lower().split("-")
        while parts:
            found = self._by_tag.get("-".join(parts))
            if found is not None:
                return found
            parts.pop()
            if parts and len(parts[-1]) == 1:
                parts.pop()  # never end on a singleton such as "x"
        return None
