"""Business Central's web client, as far as the app links to it: page 43 "Sales Invoice" opened
on one draft by URL, ``{BC_WEB_CLIENT_URL}/{tenant}/{environment}/?company=…&page=43&filter='No.' IS '…'``
(``BC_WEB_CLIENT_URL`` stands for ``https://businesscentral.dynamics.com``; here it is
``http://127.0.0.1:<port>/webclient``).

The page is a minimal, read-only rendering of the draft from the simulator's data: number,
customer number and name, status, lines (description, quantity, unit price, amount) and totals;
every value HTML-escaped, no script. What the URL does not find answers a "not found" page (404).
There is no sign-in: anyone who reaches the loopback server sees the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

if TYPE_CHECKING:
    import threading

    from sandbox.bc.backend import Backend

SALES_INVOICE_PAGE = "43"
"""Page 43 "Sales Invoice" (SourceTable "Sales Header", Document Type Invoice): the unposted ones."""
_DRAFT_STATUSES = {"Draft": "Draft", "In_x0020_Review": "In Review"}
_CONDITION = re.compile(r"'((?:[^']|'')*)'\s+IS\s+'((?:[^']|'')*)'", re.IGNORECASE)
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)
_STYLE = ("body{font-family:'Segoe UI',system-ui,sans-serif;margin:2rem;color:#212121}"
          "table{border-collapse:collapse}th,td{padding:.3rem .8rem;border-bottom:1px solid #ccc}"
          "td.n,th.n{text-align:right}dt{font-weight:600}dd{margin:0 0 .5rem}")
_CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class FilterError(ValueError):
    pass


def parse_filter(text: str) -> dict[str, str]:
    """``'No.' IS 'S-INV1001'[ AND '<field>' IS '<value>']`` → {field: value} (quotes doubled
    inside a value stand for one)."""
    conditions: dict[str, str] = {}
    for part in _AND.split(text.strip()):
        match = _CONDITION.fullmatch(part.strip())
        if match is None:
            raise FilterError(f"The filter {text!r} is not of the form 'Field' IS 'Value'[ AND …].")
        conditions[match.group(1).replace("''", "'")] = match.group(2).replace("''", "'")
    return conditions


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _amount(value: Any) -> str:
    return f"{Decimal(str(value or 0)):,.2f}"


def _quantity(value: Any) -> str:
    return f"{Decimal(str(value or 0)).normalize():f}"


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{_e(title)} - Dynamics 365 Business Central</title>\n<style>{_STYLE}</style>\n"
                f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")
    return HTMLResponse(document, status_code=status, headers={
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


def _problem(title: str, message: str, status: int) -> HTMLResponse:
    return _page(title, f"<h1>{_e(title)}</h1>\n<p role=\"alert\">{_e(message)}</p>", status)


def _invoice_page(company: str, invoice: dict) -> HTMLResponse:
    lines = invoice.get("salesInvoiceLines", [])
    rows = "\n".join(
        "<tr>"
        f"<td>{_e(line.get('description'))}</td>"
        f"<td class=\"n\">{'' if line.get('lineType') == 'Comment' else _e(_quantity(line.get('quantity')))}</td>"
        f"<td class=\"n\">{'' if line.get('lineType') == 'Comment' else _e(_amount(line.get('unitPrice')))}</td>"
        f"<td class=\"n\">{'' if line.get('lineType') == 'Comment' else _e(_amount(line.get('amountExcludingTax')))}</td>"
        "</tr>" for line in lines)
    title = f"Sales Invoice {invoice['number']}"
    body = (f"<h1>Sales Invoice <span data-field=\"No.\">{_e(invoice['number'])}</span></h1>\n"
            f"<p>{_e(company)}</p>\n"
            "<section aria-labelledby=\"general\">\n<h2 id=\"general\">General</h2>\n<dl>\n"
            f"<dt>No.</dt><dd>{_e(invoice['number'])}</dd>\n"
            f"<dt>Customer No.</dt><dd>{_e(invoice.get('customerNumber'))}</dd>\n"
            f"<dt>Customer Name</dt><dd>{_e(invoice.get('customerName'))}</dd>\n"
            f"<dt>Status</dt><dd>{_e(_DRAFT_STATUSES.get(invoice.get('status'), invoice.get('status')))}</dd>\n"
            f"<dt>External Document No.</dt><dd>{_e(invoice.get('externalDocumentNumber'))}</dd>\n"
            "</dl>\n</section>\n"
            "<section aria-labelledby=\"lines\">\n<h2 id=\"lines\">Lines</h2>\n<table>\n"
            "<thead><tr><th scope=\"col\">Description</th><th scope=\"col\" class=\"n\">Quantity</th>"
            "<th scope=\"col\" class=\"n\">Unit Price Excl. Tax</th>"
            "<th scope=\"col\" class=\"n\">Line Amount Excl. Tax</th></tr></thead>\n"
            f"<tbody>\n{rows}\n</tbody>\n</table>\n</section>\n"
            "<section aria-labelledby=\"totals\">\n<h2 id=\"totals\">Totals</h2>\n<dl>\n"
            f"<dt>Total Excl. Tax</dt><dd>{_e(_amount(invoice.get('totalAmountExcludingTax')))}</dd>\n"
            f"<dt>Total Tax</dt><dd>{_e(_amount(invoice.get('totalTaxAmount')))}</dd>\n"
            f"<dt>Total Incl. Tax</dt><dd>{_e(_amount(invoice.get('totalAmountIncludingTax')))}</dd>\n"
            "</dl>\n</section>")
    return _page(title, body)


def find_draft(backend: Backend, lock: threading.Lock, tenant: str, environment: str, company: str | None,
               number: str) -> tuple[str, dict] | str:
    """(company name, the draft invoice with its lines), or why there is none."""
    with lock:
        companies = backend.companies_of(tenant, environment)
        if not companies:
            return f"There is no environment '{environment}' in tenant '{tenant}'."
        if company is None:
            if len(companies) != 1:
                return "The environment has more than one company: name one with ?company=…"
            chosen = companies[0]
        else:
            chosen = next((c for c in companies if c.row.fields["name"] == company), None)
            if chosen is None:
                return f"There is no company '{company}' in environment '{environment}'."
        for row in chosen.tables["salesInvoices"].values():
            if row.fields["number"] == number and not row.fields["posted"]:
                invoice = backend.present(chosen, "salesInvoices", row, expand=True)
                return chosen.row.fields["name"], invoice
        return (f"The Sales Header does not exist. Identification fields and values: "
                f"Document Type='Invoice',No.='{number}'")


def web_client_app(backend: Backend, lock: threading.Lock) -> Starlette:
    """The web client's routes over a `BcSimulator`'s backend (read under the simulator's `lock`):
    ``GET /webclient/{tenant}/{environment}/``."""

    async def page(request: Request) -> HTMLResponse:
        tenant, environment = request.path_params["tenant"], request.path_params["environment"]
        params = request.query_params
        if params.get("page") != SALES_INVOICE_PAGE:
            return _problem("Page not simulated", "The simulated web client opens page 43 (Sales Invoice) only, "
                                                  f"not page {params.get('page') or '(none)'}.", 404)
        try:
            conditions = parse_filter(params.get("filter", ""))
        except FilterError as error:
            return _problem("Invalid filter", str(error), 400)
        if set(conditions) != {"No."}:
            return _problem("Filter not simulated", "The simulated web client finds a Sales Invoice by 'No.' only.",
                            400)
        number = conditions["No."].strip().upper()  # a Code field
        found = find_draft(backend, lock, tenant, environment, params.get("company"), number)
        if isinstance(found, str):
            return _problem("Sales Invoice not found", found, 404)
        return _invoice_page(*found)

    async def not_found(request: Request) -> HTMLResponse:
        return _problem("Not found", "Open a page as /webclient/{tenant}/{environment}/?company=…&page=43&filter=…",
                        404)

    return Starlette(routes=[Route("/webclient/{tenant}/{environment}/", page, methods=["GET"]),
                             Route("/webclient/{tenant}/{environment}", page, methods=["GET"]),
                             Route("/{path:path}", not_found, methods=["GET"])])
