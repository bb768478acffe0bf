"""Bookings customers in the form Business Central accepts (pure mapping; the end-to-end cases,
against the BC simulator, are in test_directory.py)."""

from __future__ import annotations

import pytest

from shared.flows.directory.customer_fields import Countries, Mapped, accepted_email, drop_refused, map_customer
from shared.flows.messages import CustomerSource

BC_COUNTRIES = Countries([{"code": code, "displayName": name} for code, name in (
    ("US", "United States"), ("GB", "United Kingdom"), ("NO", "Norway"), ("DE", "Germany"), ("NL", "Netherlands"),
    ("FR", "France"), ("RU", "Russia"))])


@pytest.mark.parametrize(("written", "code"), [
    ("United States", "US"), ("united states", "US"), ("USA", "US"), ("U.S.A.", "US"), ("us", "US"),
    ("Norge", "NO"), ("Noreg", "NO"), ("Deutschland", "DE"), ("Pays-Bas", "NL"), ("Nederland", "NL"),
    ("Holland", "NL"), ("Россия", "RU"), ("Royaume-Uni", "GB"), ("UK", "GB"), ("  france ", "FR"),
])
def test_a_country_written_as_a_name_in_several_languages_becomes_the_bc_code(written, code):
    assert BC_COUNTRIES.code_for(written) == code


def test_a_country_bc_does_not_have_is_not_guessed():
    assert BC_COUNTRIES.code_for("Narnia") is None
    assert BC_COUNTRIES.code_for("Sverige") is None  # a real country, but not in this company's table


def test_a_company_with_its_own_codes_is_matched_by_its_names():
    own = Countries([{"code": "NOR", "displayName": "Norway"}, {"code": "DEU", "displayName": "Tyskland"}])
    assert own.code_for("Norge") == "NOR"
    assert own.code_for("Deutschland") == "DEU"


def source(**fields) -> CustomerSource:
    return CustomerSource(email=fields.pop("email", "ann@example.com"), **fields)


def test_fields_bc_would_refuse_are_left_out_with_the_reason_and_the_rest_kept():
    mapped = map_customer(source(displayName="Ann Example", phone="555 0102 ext. 7", country="Narnia",
                                 city="A" * 31, postalCode="0150", addressLine1="Karl Johans gate 1"), BC_COUNTRIES)
    assert mapped.fields == {"displayName": "Ann Example", "email": "ann@example.com", "postalCode": "0150",
                             "addressLine1": "Karl Johans gate 1"}
    assert set(mapped.left_out) == {"phoneNumber", "country", "city"}
    assert "contains letters" in mapped.left_out["phoneNumber"]
    assert "'Narnia' is not a country/region in Business Central" in mapped.left_out["country"]
    assert "longer than the 30 characters" in mapped.left_out["city"]


def test_phone_numbers_with_symbols_but_no_letters_are_kept():
    assert map_customer(source(phone="+47 (22) 12-34.56"), BC_COUNTRIES).fields["phoneNumber"] == "+47 (22) 12-34.56"


@pytest.mark.parametrize(("address", "accepted"), [
    ("ann@example.com", True), ("ann.o'neil@sub.example.co.uk", True), ("ann@localhost", False),
    ("ann@example.c", False), ("ann@@example.com", False), ("a" * 75 + "@x.com", False),
])
def test_email_addresses_are_checked_the_way_bc_checks_them(address, accepted):
    assert accepted_email(address) is accepted


def test_a_long_display_name_is_shortened_not_dropped_because_bc_requires_one():
    mapped = map_customer(source(displayName="N" * 150), None)
    assert mapped.fields["displayName"] == "N" * 100


def test_a_refusal_naming_a_field_by_caption_or_value_drops_that_field_only():
    mapped = Mapped({"displayName": "Ann", "email": "ann@example.com", "country": "XX", "city": "Oslo"})
    assert drop_refused(mapped, "The field Country/Region Code of table Customer contains a value (XX) that "
                                "cannot be found in the related table (Country/Region).")
    assert "country" not in mapped.fields and "city" in mapped.fields
    assert drop_refused(mapped, "The length of the string is 4, but it must be less than or equal to 3 "
                                "characters. Value: Oslo")
    assert "city" not in mapped.fields
    assert not drop_refused(mapped, "Something about the number series.")
    assert mapped.fields == {"displayName": "Ann", "email": "ann@example.com"}
