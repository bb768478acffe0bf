"""The Country/Region table (API page ``countriesRegions``) and the list a new company starts with.

Customer "Country/Region Code" and the invoice's sell-to/ship-to country have a ``TableRelation``
to this table, so BC refuses a code that is not in it; the app must map free-text countries
(Graph's ``countryOrRegion``) to these codes. The page allows POST, PATCH (a changed ``code``
renames the record, and BC's rename carries the new code into every field related to it) and
DELETE (BC does not check whether a code is in use).
"""

from __future__ import annotations

import uuid
from typing import Any

from sandbox.bc.errors import BcError
from sandbox.bc.fields import COUNTRY, coerce_body
from sandbox.bc.store import MISSING, Company, Row, Store

_POST_CODE_CITY, _CITY_POST_CODE, _CITY_COUNTY_POST_CODE = (
    "Post_x0020_Code_x002B_City", "City_x002B_Post_x0020_Code", "City_x002B_County_x002B_Post_x0020_Code")

DEFAULT_ADDRESS_FORMAT = _CITY_POST_CODE
"""The table's ``InitValue``."""

CRONUS_COUNTRIES = {
    "AT": ("Austria", _POST_CODE_CITY), "AU": ("Australia", _CITY_COUNTY_POST_CODE),
    "BE": ("Belgium", _POST_CODE_CITY), "BG": ("Bulgaria", _POST_CODE_CITY),
    "CA": ("Canada", _CITY_COUNTY_POST_CODE), "CH": ("Switzerland", _POST_CODE_CITY),
    "CN": ("China", _POST_CODE_CITY), "CZ": ("Czechia", _POST_CODE_CITY),
    "DE": ("Germany", _POST_CODE_CITY), "DK": ("Denmark", _POST_CODE_CITY),
    "EE": ("Estonia", _POST_CODE_CITY), "ES": ("Spain", _POST_CODE_CITY),
    "FI": ("Finland", _POST_CODE_CITY), "FR": ("France", _POST_CODE_CITY),
    "GB": ("United Kingdom", _CITY_POST_CODE), "GR": ("Greece", _POST_CODE_CITY),
    "HR": ("Croatia", _POST_CODE_CITY), "HU": ("Hungary", _CITY_POST_CODE),
    "IE": ("Ireland", _CITY_POST_CODE), "IS": ("Iceland", _POST_CODE_CITY),
    "IT": ("Italy", _POST_CODE_CITY), "JP": ("Japan", _CITY_POST_CODE),
    "LT": ("Lithuania", _POST_CODE_CITY), "LU": ("Luxembourg", _POST_CODE_CITY),
    "LV": ("Latvia", _POST_CODE_CITY), "MX": ("Mexico", _CITY_COUNTY_POST_CODE),
    "NL": ("Netherlands", _POST_CODE_CITY), "NO": ("Norway", _POST_CODE_CITY),
    "NZ": ("New Zealand", _CITY_POST_CODE), "PL": ("Poland", _POST_CODE_CITY),
    "PT": ("Portugal", _POST_CODE_CITY), "RO": ("Romania", _POST_CODE_CITY),
    "RU": ("Russia", _POST_CODE_CITY), "SE": ("Sweden", _POST_CODE_CITY),
    "SI": ("Slovenia", _POST_CODE_CITY), "SK": ("Slovakia", _POST_CODE_CITY),
    "TR": ("Türkiye", _POST_CODE_CITY), "US": ("United States", _CITY_COUNTY_POST_CODE),
    "ZA": ("South Africa", _CITY_POST_CODE),
}
"""Country/Region codes of a CRONUS demo company, with English names and address formats."""

_RELATED = {"customers": ("country",), "salesInvoices": ("sellToCountry", "shipToCountry", "billToCountry")}
"""Fields that hold a Country/Region code (a rename updates them)."""


class CountryRegions(Store):
    """Operations on the Country/Region table."""

    def seed_countries(self, company: Company) -> None:
        for code, (name, address_format) in CRONUS_COUNTRIES.items():
            self.create_country(company, {"code": code, "displayName": name, "addressFormat": address_format})

    def country_exists(self, company: Company, code: str) -> bool:
        return code in company.numbers["countriesRegions"]

    def create_country(self, company: Company, body: Any) -> Row:
        values = coerce_body(COUNTRY, body)
        fields = {name: f.blank for name, f in COUNTRY.fields.items()}
        fields["addressFormat"] = DEFAULT_ADDRESS_FORMAT
        fields.update(values)
        fields["id"] = str(uuid.uuid4())
        self._index_country(company, fields["code"], fields["id"])
        return self._put(company, "countriesRegions", fields["id"], fields)

    def modify_country(self, company: Company, row: Row, body: Any) -> Row:
        values = coerce_body(COUNTRY, body)
        fields = {**row.fields, **values}
        old, new = row.fields["code"], fields["code"]
        if new != old:
            self._index_country(company, new, fields["id"], old)
            self._rename_related(company, old, new)
        return self._put(company, "countriesRegions", fields["id"], fields)

    def delete_country(self, company: Company, row: Row) -> None:
        self._journal.set(company.numbers["countriesRegions"], row.fields["code"], MISSING)
        self._journal.set(company.tables["countriesRegions"], row.fields["id"], MISSING)

    def _index_country(self, company: Company, code: str, record_id: str, old_code: str | None = None) -> None:
        index = company.numbers["countriesRegions"]
        if code in index and index[code] != record_id:
            raise BcError(400, "Internal_EntityWithSameKeyExists",
                          "The record in table Country/Region already exists. Identification fields and values: "
                          f"Code='{code}'")
        if old_code is not None:
            self._journal.set(index, old_code, MISSING)
        self._journal.set(index, code, record_id)

    def _rename_related(self, company: Company, old: str, new: str) -> None:
        for set_name, names in _RELATED.items():
            for record_id, row in list(company.tables[set_name].items()):
                changed = {name: new for name in names if row.fields[name] == old}
                if changed:
                    self._journal.set(company.tables[set_name], record_id,
                                      Row({**row.fields, **changed}, self._version()))
