"""What Business Central's refusals mean, in words a bookkeeper can act on, and where a person
opens a draft in BC's web client.

BC words a refusal for the AL code that raised it (a `TestField`, a table relation, an `Error`
label). The patterns below match the messages of the setups that commonly stop an invoice (a
posting group or VAT Posting Setup missing, a customer or item blocked, a number series that
cannot assign numbers, a template value BC has no record of) and say what to fix where; any other
refusal is passed on as BC worded it."""

from __future__ import annotations

import re
from urllib.parse import quote

_FIXES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"(?P<field>Customer Posting Group|Gen\. Bus\. Posting Group) must have a value in "
                r"Customer: No\.=(?P<number>[^\s.]+)", re.IGNORECASE),
     "Customer {number} has no {field} in Business Central. Fix: set its {field} on the customer card in "
     "Business Central, and give the customer template chosen on BC's API Setup page a {field} so that new "
     "customers get one; then invoice these bookings again."),
    (re.compile(r"(?P<field>Gen\. Prod\. Posting Group|Inventory Posting Group) must have a value in "
                r"Item: No\.=(?P<number>[^\s.]+)", re.IGNORECASE),
     "Item {number} has no {field} in Business Central. Fix: set its {field} on the item card (or set "
     "generalProductPostingGroupCode in the item template named by ITEM_TEMPLATE, for new items); then "
     "invoice these bookings again."),
    (re.compile(r"Customer (?P<number>\S+) is blocked with type (?P<kind>\w+)", re.IGNORECASE),
     "Customer {number} is blocked in Business Central (Blocked = {kind}). Fix: clear Blocked on the customer "
     "card if the customer may be invoiced; then invoice these bookings again."),
    (re.compile(r"Blocked must be equal to 'No'\s+in Item: No\.=(?P<number>[^\s.]+)", re.IGNORECASE),
     "Item {number} is blocked in Business Central. Fix: clear Blocked on the item card; then invoice these "
     "bookings again."),
    (re.compile(r"You cannot sell Item (?P<number>\S+) because the Sales Blocked check box is selected", re.IGNORECASE),
     "Item {number} is blocked for sales in Business Central (Sales Blocked, which BC's API does not show). Fix: "
     "clear Sales Blocked on the item card if it may be invoiced (or take the service off Bookings); then invoice "
     "these bookings again."),
    (re.compile(r"The VAT Posting Setup does not exist\. Identification fields and values: "
                r"VAT Bus\. Posting Group='(?P<bus>[^']*)',\s*VAT Prod\. Posting Group='(?P<prod>[^']*)'", re.IGNORECASE),
     "Business Central has no VAT Posting Setup for VAT Bus. Posting Group '{bus}' (the customer's) and VAT Prod. "
     "Posting Group '{prod}' (the item's). Fix: add that combination on BC's VAT Posting Setup page, or give the "
     "customer or item groups that have one (and the customer and item templates on BC's API Setup page, for new "
     "ones); then invoice these bookings again."),
    (re.compile(r'The "(?P<field>currencyCode|currencyId|paymentTermsId|shipmentMethodId|paymentMethodId|taxAreaId|'
                r'itemCategoryCode|itemCategoryId|taxGroupCode|taxGroupId|baseUnitOfMeasureId)" does not match to an? '
                r"(?:specific )?(?P<table>[^.]+?)(?: group)?\.", re.IGNORECASE),
     "Business Central has no {table} that {field} names. Fix: set {field} in the customer or item template (the "
     "one CUSTOMER_TEMPLATE or ITEM_TEMPLATE names, PUT /api/templates/…) to a value Business Central has, or "
     "create that {table} in Business Central; the next sync tries again."),
    (re.compile(r"The field (?P<caption>Salesperson Code|Gen\. Prod\. Posting Group|Inventory Posting Group) "
                r"of table (?P<table>Customer|Item) contains a value "
                r"\((?P<value>[^)]*)\) that cannot be found in the related table \((?P<related>[^)]+)\)", re.IGNORECASE),
     "Business Central has no {related} '{value}' (the {caption} of the new {table}). Fix: correct it in the "
     "template that CUSTOMER_TEMPLATE (customers) or ITEM_TEMPLATE (items) names (PUT /api/templates/…), or "
     "create it in Business Central; the next sync tries again."),
    (re.compile(r"The Unit of Measure with Code (?P<code>.+?) does not exist", re.IGNORECASE),
     "Business Central has no Unit of Measure '{code}' (the baseUnitOfMeasureCode of the item template). Fix: "
     "correct it in the template ITEM_TEMPLATE names (PUT /api/templates/item/…) or create it in Business "
     "Central; the next sync tries again."),
    (re.compile(r"Invoice Nos\. must have a value|number series|numbers manually|numbers automatically", re.IGNORECASE),
     "Business Central has no usable number series for sales invoices. Fix: set Invoice Nos. in Sales & "
     "Receivables Setup to a number series that can assign numbers; then invoice these bookings again."),
]


def explain_refusal(message: str) -> str:
    """BC's refusal in words a bookkeeper can act on: what is wrong, and what to fix in BC.
    An unknown refusal is passed on as BC worded it."""
    for pattern, advice in _FIXES:
        match = pattern.search(message)
        if match:
            return advice.format(**match.groupdict()) + f" (Business Central said: {message})"
    return f"Business Central refused it: {message}"


SALES_INVOICE_PAGE = 43


def web_client_invoice_url(settings, company_name: str | None, number: str) -> str:
    """Where a person opens a draft sales invoice in BC's web client (page 43, filtered to its No.)."""
    query = [f"page={SALES_INVOICE_PAGE}", "filter=" + quote(f"'No.' IS '{number}'", safe="")]
    if company_name:
        query.insert(0, "company=" + quote(company_name, safe=""))
    return f"{settings.bc_web_client_url}/{settings.tenant_id}/{settings.bc_environment}/?{'&'.join(query)}"
