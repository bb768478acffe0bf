"""The field validations of BC's tables that fire when the API writes a record, with BC's
messages: phone numbers without letters, e-mail addresses as Mail Management checks them,
table relations (a country code must exist), ``TestField`` on posting groups, blocked customers.

Sources (microsoft/BCApps, W1 BaseApp): Customer.Table.al (``Phone No.``, ``E-Mail``,
``CheckBlockedCustOnDocs``), SalesHeader.Table.al (``Sell-to Phone No.``, ``Sell-to E-Mail``,
the sell-to/bill-to customer checks), SalesLine.Table.al (``CopyFromItem``),
MailManagement.Codeunit.al and EmailAccountImpl.Codeunit.al (the address rules).
"""

from __future__ import annotations

import re

from sandbox.bc.errors import BcError, dialog

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[^"\\\r\n]|\\.)*"'
_ADDRESS = rf"(?:{_DOT_ATOM}|{_QUOTED})@(?:{_DOT_ATOM}|\[[^\[\]\\\r\n]*\])"
_BARE = re.compile(rf"^(?P<address>{_ADDRESS})$")
_NAMED = re.compile(rf"^(?:{_QUOTED}|[^<>\"]*?)\s*<(?P<address>{_ADDRESS})>$")


def field_error(message: str) -> BcError:
    """``TestField``/``FieldError``: BC's ``NavTestFieldException``."""
    return BcError(400, "Application_FieldValidationException", message)


def must_have_value(caption: str, table: str, key_caption: str, key: str) -> BcError:
    """``Rec.TestField(Field)`` on a blank field, worded as BC words it."""
    return field_error(f"{caption} must have a value in {table}: {key_caption}={key}. It cannot be zero or empty.")


def has_letters(text: str) -> bool:
    """.NET ``Char.IsLetter`` on any character (any script's letters: Lu, Ll, Lt, Lm, Lo)."""
    return any(ch.isalpha() for ch in text)


def check_customer_phone(phone: str, customer_number: str) -> None:
    """Customer "Phone No." OnValidate: ``FieldError("Phone No.", 'must not contain letters')``."""
    if has_letters(phone):
        raise field_error(f"Phone No. must not contain letters in Customer No.='{customer_number}'.")


def check_document_phone(phone: str) -> None:
    """Sales Header "Sell-to Phone No." OnValidate: ``Error('You cannot enter letters in this field.')``."""
    if has_letters(phone):
        raise dialog("You cannot enter letters in this field.")


def check_email_addresses(recipients: str) -> None:
    """``MailManagement.CheckValidEmailAddresses``: ';'-separated addresses, each checked.

    The caller skips a blank value (the Customer and Sales Header triggers do)."""
    if recipients == "":
        raise _invalid_email(recipients)
    rest = recipients.strip(";")
    while rest.find(";") > 0:
        position = rest.find(";")
        _check_email_address(rest[:position])
        rest = rest[position + 1:]
    _check_email_address(rest)


def _check_email_address(address: str) -> None:
    """``MailManagement.CheckValidEmailAddress`` then ``EmailAccount.ValidateEmailAddress``: exactly
    one ``@``, an address .NET's ``MailAddress`` accepts, a ``.`` in the domain after its first
    character, and a top-level domain of at least two characters."""
    address = address.strip(" ")
    if address.count("@") != 1:
        raise _invalid_email(address)
    converted = _mail_address(address)
    if converted is None:
        raise _invalid_email(address)
    if "." not in converted[converted.index("@") + 2:]:
        raise _invalid_email(address)
    if converted[-1] == "." or converted[-2] == ".":
        raise _invalid_email(address)


def _mail_address(text: str) -> str | None:
    """The address part of what .NET ``System.Net.Mail.MailAddress`` accepts (``a@b.c`` or
    ``Name <a@b.c>``), or None. Stricter than .NET in one way: an unquoted display name without
    angle brackets (``bob smith@x.com``) is refused rather than read as a display name."""
    match = _BARE.match(text) or _NAMED.match(text)
    return match.group("address") if match else None


def _invalid_email(address: str) -> BcError:
    return dialog(f'The email address "{address}" is not valid.')


def table_relation(caption: str, table: str, value: str, related_table: str) -> BcError:
    """A value with no record in the related table: BC's ``NavCSideValidateTableRelationException``."""
    return BcError(400, "Internal_InvalidTableRelation",
                   f"The field {caption} of table {table} contains a value ({value}) that cannot be found in the "
                   f"related table ({related_table}).")


BLOCKED_LABELS = {"_x0020_": " ", "Ship": "Ship", "Invoice": "Invoice", "All": "All"}


def check_customer_not_blocked(customer: dict, action: str) -> None:
    """``Customer.CheckBlockedCustOnDocs`` for a sales invoice: ``All`` and ``Invoice`` block it
    (``Ship`` only blocks shipping). `action` is ``create`` or ``post``."""
    if customer["blocked"] in ("All", "Invoice"):
        raise dialog(f"You cannot {action} this type of document when Customer {customer['number']} is blocked "
                     f"with type {BLOCKED_LABELS[customer['blocked']]}")
