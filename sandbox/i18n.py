"""The pages' message catalogs: extract every message the templates and page code show, and bring
each language's `messages.po` up to date with it (`make i18n`).

Extraction is Babel's own (Jinja2's extractor for templates, Babel's for Python, with `N_` for
messages translated when shown); a test (`tests/test_pages.py`) runs the same extraction and fails
when a language lacks a translation, so a new label cannot ship in English only."""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po, write_po

from shared.web.blueprints.pages.render import DEFAULT_LANGUAGE, HERE, LANGUAGES, catalog_path

METHODS = [("templates/**.html", "jinja2"), ("**.py", "python")]
OPTIONS = {"templates/**.html": {"extensions": "jinja2.ext.i18n", "newstyle_gettext": "true",
                                 "trim_blocks": "true", "lstrip_blocks": "true"}}
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}


def extract() -> Catalog:
    """Every message of the pages, with where it is used."""
    catalog = Catalog(project="bookings-invoicing", charset="utf-8")
    for filename, lineno, message, comments, context in extract_from_dir(
            HERE, METHODS, options_map=OPTIONS, keywords=KEYWORDS):
        catalog.add(message, None, [(filename, lineno)], auto_comments=comments, context=context)
    return catalog


def read(language: str) -> Catalog:
    with catalog_path(language).open("rb") as source:
        return read_po(source, locale=language)


def update() -> dict[str, int]:
    """Merge the extracted messages into every language's catalog; returns untranslated counts."""
    template = extract()
    missing = {}
    for language in LANGUAGES:
        if language == DEFAULT_LANGUAGE:
            continue
        path = catalog_path(language)
        catalog = read(language) if path.exists() else Catalog(locale=language, project="bookings-invoicing")
        catalog.update(template, update_header_comment=False)
        catalog.fuzzy = False
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as target:
            write_po(target, catalog, width=120, omit_header=False, ignore_obsolete=True)
        missing[language] = sum(1 for m in catalog if m.id and (not m.string or m.fuzzy))
    return missing


def main() -> int:
    for language, count in update().items():
        print(f"{language}: {count} messages to translate in {catalog_path(language).relative_to(Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
