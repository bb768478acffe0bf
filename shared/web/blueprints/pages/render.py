"""Turning page data into HTML, in the reader's language.

One Jinja2 environment per supported locale, built on first use: autoescaping on for every
template (a customer called `<script>` is text), gettext from the locale's catalog
(`locales/<lang>/LC_MESSAGES/messages.po`, read with Babel and compiled in memory, so there is no
build step), and filters that format dates, numbers and amounts with Babel's CLDR data for that
locale, never with hand-made tables.

Only constant message ids are translated: `_()` in a template takes a string literal (a test
checks every template), and page code hands templates a `Message` (an id marked with `N_`, plus
runtime values) or plain text, which the template shows with `say()`. Runtime text is never a
message id, so it is always escaped and never read as a format string; the catalog's own text is
escaped too."""

from __future__ import annotations

import io
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from markupsafe import Markup, escape

from shared.flows.bookings import parse_instant

if TYPE_CHECKING:
    from babel.support import NullTranslations
    from jinja2 import Environment

# Babel and Jinja2 are imported where they are used (about 16 ms): an instance that only syncs and
# invoices never shows a page, and the Functions host imports the app on every cold start.

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
LOCALES_DIR = HERE / "locales"
STATIC = HERE / "static"

LANGUAGES = {"en": "English", "nb": "Norsk bokmål", "nl": "Nederlands", "de": "Deutsch", "ru": "Русский",
             "fr": "Français"}
"""English and the languages of Business Central's own Bookings pages, each named in itself."""
DEFAULT_LANGUAGE = "en"


@dataclass(frozen=True)
class Message:
    """A message of the pages' catalog: a constant id and the runtime values its `%(name)s`
    placeholders stand for (escaped when shown, like any text)."""
    id: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def with_values(self, **values: Any) -> Message:
        return Message(self.id, {**self.values, **values})


def N_(text: str, **values: Any) -> Message:  # noqa: N802 - gettext's name for "translate later"
    """Marks a message the pages translate when they show it (Babel extracts `N_`)."""
    return Message(text, values)


def catalog_path(language: str) -> Path:
    return LOCALES_DIR / language / "LC_MESSAGES" / "messages.po"


@cache
def translations(language: str) -> NullTranslations:
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po
    from babel.support import NullTranslations, Translations

    path = catalog_path(language)
    if language == DEFAULT_LANGUAGE or not path.exists():
        return NullTranslations()
    with path.open("rb") as source:
        catalog = read_po(source, locale=language)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(compiled)


def choose_language(requested: str | None, cookie: str | None, accept_language: str | None) -> str:
    """An explicit choice (the switcher, then its cookie), else the browser's preference."""
    from babel.core import negotiate_locale

    for choice in (requested, cookie):
        if choice in LANGUAGES:
            return choice
    preferred = []
    for index, item in enumerate((accept_language or "").split(",")):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0:
            preferred.append((-quality, index, tag.strip()))
    tags = [tag for _, _, tag in sorted(preferred)]
    # Norwegian browsers send "no" or "nn" as often as "nb": Bokmål is what BC's pages offered.
    tags = [("nb" if tag.split("-")[0].lower() in ("no", "nn") else tag) for tag in tags]
    found = negotiate_locale(tags, list(LANGUAGES), sep="-") or negotiate_locale(
        [tag.split("-")[0] for tag in tags], list(LANGUAGES), sep="-")
    return found or DEFAULT_LANGUAGE


class Formats:
    """Locale-aware formatting of what the pages show."""

    def __init__(self, language: str, time_zone: str):
        from babel import Locale, UnknownLocaleError

        try:
            self.locale = Locale.parse(language)
        except (UnknownLocaleError, ValueError):
            self.locale = Locale.parse(DEFAULT_LANGUAGE)
        self.zone = ZoneInfo(time_zone)

    def when(self, value: str | datetime | None) -> str:
        from babel.dates import format_date, format_time

        moment = parse_instant(value)
        if moment is None:
            return ""
        local = moment.astimezone(self.zone)
        # The locale's medium date with its short time (no seconds), joined as the locale joins them.
        pattern = str(self.locale.datetime_formats["medium"])
        return pattern.replace("{1}", format_date(local, "medium", locale=self.locale)).replace(
            "{0}", format_time(local, "short", locale=self.locale))

    def date_value(self, value: str | datetime | None) -> str:
        """For a date input (ISO, the browser shows it in its own way)."""
        moment = parse_instant(value)
        return moment.astimezone(self.zone).date().isoformat() if moment else ""

    def amount(self, value: float | Decimal | str | None) -> str:
        from babel.numbers import format_decimal

        if value is None or value == "":
            return ""
        return format_decimal(Decimal(str(value)), format="#,##0.00", locale=self.locale)

    def number(self, value: float | Decimal | int | None) -> str:
        from babel.numbers import format_decimal

        if value is None:
            return ""
        return format_decimal(Decimal(str(value)).normalize(), locale=self.locale)

    def zone_name(self) -> str:
        from babel.dates import get_timezone_name

        return get_timezone_name(self.zone, locale=self.locale)


def say(language: str, value: Message | str | None) -> Markup:
    """A `Message` translated with its values escaped, or runtime text escaped as it is."""
    if isinstance(value, Message):
        text = escape(translations(language).gettext(value.id))
        # Markup's % escapes every value it puts in.
        return text % dict(value.values) if value.values else text
    return escape("" if value is None else value)


@cache
def environment(language: str) -> Environment:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      extensions=["jinja2.ext.i18n"], trim_blocks=True, lstrip_blocks=True)
    catalog = translations(language)
    # The catalog's text is escaped too: a translation is text, never markup.
    env.install_gettext_callables(lambda message: escape(catalog.gettext(message)),
                                  lambda singular, plural, n: escape(catalog.ngettext(singular, plural, n)),
                                  newstyle=True)
    env.globals["say"] = lambda value: say(language, value)
    return env


def render(template: str, language: str, time_zone: str, **context) -> str:
    formats = Formats(language, time_zone)
    return environment(language).get_template(template).render(
        fmt=formats, language=language, languages=LANGUAGES, **context)
