"""Sales invoices and their lines, as the APIV2 salesInvoices/salesInvoiceLines pages keep them.

An invoice takes its sell-to and bill-to customer (by id or number) and copies what BC copies
from them; a line takes its item and what BC copies from the item. BC's checks run where BC runs
them: a blocked customer or one without posting groups is refused when the invoice gets its
customer, an item without posting groups when a line gets the item, a number series that cannot
assign a number when the invoice is inserted. Only drafts can be changed: a released one (which the
API shows as ``Open``, like a posted one) must be reopened first, a posted one never.
Totals are recalculated after every change of a line, which gives the invoice a new ETag too,
as in BC. The simulated company has no tax.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sandbox.bc.errors import BcError, dialog
from sandbox.bc.fields import INVOICE, LCY_CODE, LINE, ZERO_GUID, coerce_body, money
from sandbox.bc.rules import (check_customer_not_blocked, check_document_phone, check_email_addresses, field_error,
                              must_have_value)
from sandbox.bc.dimensions import Dimensions
from sandbox.bc.setup import check_vat_posting_setup
from sandbox.bc.store import MISSING, Company, Row


class SalesInvoices(Dimensions):
    """Operations on sales invoices and their lines."""

    def _customer(self, company: Company, customer_id: str | None, number: str | None, role: str) -> Row:
        customer_id = None if customer_id == ZERO_GUID else customer_id
        found = company.tables["customers"].get(customer_id) if customer_id else None
        if customer_id and found is None:
            raise dialog(f"The {role} customer cannot be found.")
        if number:
            by_number = company.numbers["customers"].get(number)
            if by_number is None:
                raise dialog(f"The {role} customer cannot be found.")
            if found is not None and found.fields["id"] != by_number:
                raise dialog(f"The {role} customer values do not match to a specific Customer.")
            found = company.tables["customers"][by_number]
        if found is None:
            raise dialog(f"The {role} customer must be given by its number or its id.")
        return found

    def create_invoice(self, company: Company, body: Any, *, api: bool) -> Row:
        values = coerce_body(INVOICE, body, navigation=("salesInvoiceLines",))
        lines = body.get("salesInvoiceLines", [])
        if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
            raise BcError(400, "BadRequest", "Invalid Request Body: 'salesInvoiceLines' must be an array of objects.")
        if values.get("customerId", ZERO_GUID) == ZERO_GUID and not values.get("customerNumber"):
            raise dialog('A "customerNumber" or a "customerId" must be provided.')
        self._check_relations(company, INVOICE, values)
        fields = {name: f.blank for name, f in INVOICE.fields.items()}
        record_id = str(uuid.uuid4())
        today = dt.date.today().isoformat()
        fields.update(id=record_id, status="Draft", invoiceDate=today, postingDate=today, dueDate=today,
                      discountAppliedBeforeTax=True)
        self._apply_customers(company, fields, values, new=True)
        self._validate_header(values)
        fields.update({k: v for k, v in values.items() if k not in ("customerId", "customerNumber",
                                                                     "billToCustomerId", "billToCustomerNumber")})
        self.set_dimension_set(company, record_id, self._header_defaults(company, fields))
        if "invoiceDate" in values and "dueDate" not in values:
            fields["dueDate"] = values["invoiceDate"]
        if company.series_problems.get("postedSalesInvoices") == "missing":
            self._check_series(company, "postedSalesInvoices")  # TestNoSeries: "Posted Invoice Nos." is set
        fields["number"] = self._next_number(company, "salesInvoices")
        self._index_number(company, "salesInvoices", fields["number"], record_id)
        inserted = self._put(company, "salesInvoices", record_id, fields)
        self._journal.set(company.lines_of, record_id, {})
        if api:
            self._journal.creates.append("salesInvoices")
        for line in lines:
            self.create_line(company, record_id, line, api=api)
        current = self._recalculate(company, record_id)
        # Whether a deep insert's answer shows the totals its lines made is not documented.
        return current if self.options.deep_insert_answer_has_totals or not lines else Row(
            {**current.fields, **{k: inserted.fields[k] for k in TOTALS}}, current.version)

    def _apply_customers(self, company: Company, fields: dict[str, Any], values: dict[str, Any], new: bool) -> None:
        """Sell-to and bill-to customer and everything BC copies from them onto the header."""
        sell_to_given = any(k in values for k in ("customerId", "customerNumber"))
        if sell_to_given:
            customer = self._customer(company, values.get("customerId"), values.get("customerNumber"), "sell-to")
            c = customer.fields
            check_customer_not_blocked(c, "create")
            if not self.options.sales_tax and not c["genBusPostingGroup"]:
                raise must_have_value("Gen. Bus. Posting Group", "Customer", "No.", c["number"])
            fields.update(customerId=c["id"], customerNumber=c["number"], customerName=c["displayName"],
                          shipToName=c["displayName"], sellToAddressLine1=c["addressLine1"],
                          sellToAddressLine2=c["addressLine2"], sellToCity=c["city"], sellToCountry=c["country"],
                          sellToState=c["state"], sellToPostCode=c["postalCode"],
                          shipToAddressLine1=c["addressLine1"], shipToAddressLine2=c["addressLine2"],
                          shipToCity=c["city"], shipToCountry=c["country"], shipToState=c["state"],
                          shipToPostCode=c["postalCode"], currencyId=c["currencyId"],
                          currencyCode=c["currencyCode"] or LCY_CODE, paymentTermsId=c["paymentTermsId"],
                          shipmentMethodId=c["shipmentMethodId"], salesperson=c["salespersonCode"],
                          phoneNumber=c["phoneNumber"], email=c["email"], locationCode=c["locationCode"])
        bill_to_given = any(k in values for k in ("billToCustomerId", "billToCustomerNumber"))
        if bill_to_given or (new or sell_to_given):
            if bill_to_given:
                bill_to = self._customer(company, values.get("billToCustomerId"),
                                         values.get("billToCustomerNumber"), "bill-to").fields
            else:
                bill_to = company.tables["customers"][fields["customerId"]].fields
            check_customer_not_blocked(bill_to, "create")
            if not bill_to["customerPostingGroup"]:
                raise must_have_value("Customer Posting Group", "Customer", "No.", bill_to["number"])
            fields.update(billToCustomerId=bill_to["id"], billToCustomerNumber=bill_to["number"],
                          vatBusPostingGroup=bill_to["vatBusPostingGroup"],
                          billToName=bill_to["displayName"], billToAddressLine1=bill_to["addressLine1"],
                          billToAddressLine2=bill_to["addressLine2"], billToCity=bill_to["city"],
                          billToCountry=bill_to["country"], billToState=bill_to["state"],
                          billToPostCode=bill_to["postalCode"])

    def _header_defaults(self, company: Company, fields: dict[str, Any]) -> dict[str, str]:
        """SalesHeader.InitDefaultDimensionSources: bill-to customer, salesperson, (campaign,
        responsibility center, customer template: not simulated), location."""
        return self.default_dimensions(company, [
            ("customers", fields["billToCustomerNumber"]), ("salespeople", fields["salesperson"]),
            ("locations", fields["locationCode"])])

    @staticmethod
    def _validate_header(values: dict[str, Any]) -> None:
        """The Sales Header's OnValidate triggers of the contact fields a request sets."""
        if values.get("phoneNumber"):
            check_document_phone(values["phoneNumber"])
        if values.get("email"):
            check_email_addresses(values["email"])

    def _draft(self, company: Company, invoice_id: str, released: bool = False) -> Row:
        """An unposted invoice that may be changed (`released`: a released one too)."""
        invoice = self.row(company, "salesInvoices", invoice_id)
        if invoice.fields["posted"]:
            raise dialog("The invoice has been posted and can no longer be modified.")
        if invoice.fields["released"] and not released:
            raise field_error("Status must be equal to 'Open'  in Sales Header: Document Type=Invoice, "
                              f"No.={invoice.fields['number']}. Current value is 'Released'.")
        return invoice

    def release_invoice(self, company: Company, invoice_id: str) -> Row:
        """Release (ReleaseSalesDocument): the API shows the unposted invoice as ``Open``."""
        invoice = self._draft(company, invoice_id)
        lines = [company.tables["salesInvoiceLines"][i].fields for i in company.lines_of.get(invoice_id, {})]
        if not any(line["lineType"] != "Comment" and line["quantity"] for line in lines):
            raise dialog("There is nothing to release for the document of type Invoice with the number "
                         f"{invoice.fields['number']}.")
        return self._put(company, "salesInvoices", invoice_id, {**invoice.fields, "released": True, "status": "Open"})

    def reopen_invoice(self, company: Company, invoice_id: str) -> Row:
        invoice = self._draft(company, invoice_id, released=True)
        return self._put(company, "salesInvoices", invoice_id, {**invoice.fields, "released": False, "status": "Draft"})

    def pay_invoice(self, company: Company, invoice_id: str) -> Row:
        """The customer ledger entry of a posted invoice closed by a payment: status ``Paid``."""
        invoice = self.row(company, "salesInvoices", invoice_id)
        if not invoice.fields["posted"]:
            raise dialog("The action can be applied to a posted invoice only.")
        return self._put(company, "salesInvoices", invoice_id, {**invoice.fields, "status": "Paid",
                                                               "remainingAmount": Decimal(0)})

    def modify_invoice(self, company: Company, row: Row, body: Any) -> Row:
        if isinstance(body, dict) and "salesInvoiceLines" in body:
            raise BcError(400, "BadRequest", "Navigation property 'salesInvoiceLines' cannot be set with PATCH; "
                                             "use the salesInvoiceLines entity set.")
        values = coerce_body(INVOICE, body)
        self._draft(company, row.fields["id"])
        self._check_relations(company, INVOICE, values)
        fields = dict(row.fields)
        self._apply_customers(company, fields, values, new=False)
        self._validate_header(values)
        fields.update({k: v for k, v in values.items() if k not in ("customerId", "customerNumber",
                                                                     "billToCustomerId", "billToCustomerNumber")})
        if any(name in values for name in ("customerId", "customerNumber", "billToCustomerId", "billToCustomerNumber")):
            # SalesHeader.CreateDim: a new customer makes the header's set from the default sources
            # again (what was set by hand is gone); the existing lines are not simulated to follow.
            self.set_dimension_set(company, fields["id"], self._header_defaults(company, fields))
        self._put(company, "salesInvoices", fields["id"], fields)
        return self._recalculate(company, fields["id"])

    def delete_invoice(self, company: Company, invoice_id: str) -> None:
        invoice = self._draft(company, invoice_id, released=True)  # Sales Header OnDelete checks no status
        for line_id in list(company.lines_of.get(invoice_id, {})):
            self._journal.set(company.tables["salesInvoiceLines"], line_id, MISSING)
            self.set_dimension_set(company, line_id, {})
        self.set_dimension_set(company, invoice_id, {})
        self._journal.set(company.lines_of, invoice_id, MISSING)
        self._journal.set(company.numbers["salesInvoices"], invoice.fields["number"], MISSING)
        self._journal.set(company.tables["salesInvoices"], invoice_id, MISSING)

    def post_invoice(self, company: Company, invoice_id: str) -> Row:
        invoice = self._draft(company, invoice_id, released=True)
        lines = [company.tables["salesInvoiceLines"][i].fields for i in company.lines_of.get(invoice_id, {})]
        if not any(line["lineType"] != "Comment" and line["quantity"] for line in lines):
            raise dialog("There is nothing to post.")
        self.check_posting_dimensions(company, invoice, list(company.lines_of.get(invoice_id, {})))
        for customer_id in dict.fromkeys((invoice.fields["customerId"], invoice.fields["billToCustomerId"])):
            customer = company.tables["customers"].get(customer_id)
            if customer is not None:
                check_customer_not_blocked(customer.fields, "post")
        fields = dict(invoice.fields)
        if self.options.posted_invoice_keeps_number:
            number = fields["number"]
        else:
            number = self._next_number(company, "postedSalesInvoices")
            self._index_number(company, "salesInvoices", number, invoice_id, fields["number"])
        fields.update(number=number, status="Open", posted=True, released=False)
        self._put(company, "salesInvoices", invoice_id, fields)
        return self._recalculate(company, invoice_id)

    def _recalculate(self, company: Company, invoice_id: str) -> Row:
        """Header totals from the lines (no tax in the simulated company)."""
        invoice = company.tables["salesInvoices"][invoice_id]
        lines = [company.tables["salesInvoiceLines"][i].fields for i in company.lines_of.get(invoice_id, {})]
        lines_total = sum((line["amountExcludingTax"] for line in lines), Decimal(0))
        total = money(lines_total - invoice.fields["discountAmount"])
        totals = {"totalAmountExcludingTax": total, "totalTaxAmount": Decimal(0),
                  "totalAmountIncludingTax": total, "remainingAmount": total}
        if all(invoice.fields[k] == v for k, v in totals.items()):
            return invoice
        return self._put(company, "salesInvoices", invoice_id, {**invoice.fields, **totals})

    # sales invoice lines

    def create_line(self, company: Company, invoice_id: str, body: Any, *, api: bool) -> Row:
        invoice = self._draft(company, invoice_id)
        values = coerce_body(LINE, body)
        if values.get("documentId", invoice_id) != invoice_id:
            raise dialog('The value for "documentId" cannot be modified.')
        fields = {name: f.blank for name, f in LINE.fields.items()}
        fields.update(id=str(uuid.uuid4()), documentId=invoice_id, discountAppliedBeforeTax=True)
        self._apply_line_object(company, invoice.fields, fields, values)
        existing = [company.tables["salesInvoiceLines"][i].fields["sequence"] for i in company.lines_of[invoice_id]]
        fields["sequence"] = values.get("sequence") or (max(existing, default=0) + 10000)
        if fields["sequence"] in existing:
            # SalesInvoiceAggregator.PropagateInsertLine looks for the line before inserting it.
            raise dialog("You cannot insert a line because a line already exists.")
        fields.update({k: v for k, v in values.items() if k not in ("itemId", "accountId", "lineType",
                                                                     "lineObjectNumber", "sequence")})
        _line_amounts(fields, "discountAmount" in values)
        row = self._put(company, "salesInvoiceLines", fields["id"], fields)
        self._journal.set(company.lines_of[invoice_id], fields["id"], None)
        # SalesLine.CreateDim: a new line inherits the header's dimension set as it is now, merged
        # with its item's default dimensions.
        dimensions = self.dimension_set(company, invoice_id)
        if fields["lineType"] == "Item":
            for code, value in self.default_dimensions(company, [("items", fields["lineObjectNumber"])]).items():
                if code not in dimensions or self.options.line_default_dims_override_header:
                    dimensions[code] = value
        self.set_dimension_set(company, fields["id"], dimensions)
        if api:
            self._journal.creates.append("salesInvoiceLines")
        self._recalculate(company, invoice_id)
        return row

    def _apply_line_object(self, company: Company, header: dict[str, Any], fields: dict[str, Any],
                           values: dict[str, Any]) -> None:
        """Line type and the item (or account) it sells, with what BC copies from the item
        (SalesLine.CopyFromItem), then the VAT Posting Setup of the header's and item's groups."""
        if values.get("itemId") and values.get("accountId"):
            raise dialog('Both "itemId" and "accountId" are specified. Specify only one of them.')
        if "itemId" in values:
            line_type = "Item"
        elif "accountId" in values:
            line_type = "Account"
        else:
            line_type = values.get("lineType", "Comment")
        fields["lineType"] = line_type
        if line_type == "Item":
            item_id = values.get("itemId")
            if item_id is None and values.get("lineObjectNumber"):
                item_id = company.numbers["items"].get(values["lineObjectNumber"])
            item = company.tables["items"].get(item_id or "")
            if item is None:
                raise dialog("Item does not exist.")
            i = item.fields
            if i["blocked"]:
                raise BcError(400, "Application_FieldValidationException",
                              f"Blocked must be equal to 'No'  in Item: No.={i['number']}. Current value is 'Yes'.")
            if not i["generalProductPostingGroupCode"]:
                raise must_have_value("Gen. Prod. Posting Group", "Item", "No.", i["number"])
            if i["salesBlocked"]:
                raise dialog(f"You cannot sell Item {i['number']} because the Sales Blocked check box is selected on "
                             "the Item card.")
            if i["type"] == "Inventory" and not i["inventoryPostingGroupCode"]:
                raise must_have_value("Inventory Posting Group", "Item", "No.", i["number"])
            check_vat_posting_setup(company.vat_posting_setup, header["vatBusPostingGroup"], i["vatProdPostingGroup"])
            fields.update(itemId=i["id"], lineObjectNumber=i["number"], description=i["displayName"],
                          unitPrice=i["unitPrice"], unitOfMeasureCode=i["baseUnitOfMeasureCode"],
                          unitOfMeasureId=i["baseUnitOfMeasureId"])
        elif line_type == "Account":
            fields.update(accountId=values.get("accountId", ZERO_GUID),
                          lineObjectNumber=values.get("lineObjectNumber", ""))
        else:
            fields["lineObjectNumber"] = values.get("lineObjectNumber", "")

    def modify_line(self, company: Company, row: Row, body: Any) -> Row:
        values = coerce_body(LINE, body)
        old = row.fields
        self._draft(company, old["documentId"])
        if values.get("documentId", old["documentId"]) != old["documentId"]:
            raise dialog('The value for "documentId" cannot be modified.')
        if values.get("sequence", old["sequence"]) != old["sequence"]:
            raise dialog('The value for "sequence" cannot be modified. Delete and insert the line again.')
        for name in ("lineObjectNumber", "itemId", "accountId", "lineType"):
            if name in values and values[name] != old[name] and old["lineObjectNumber"]:
                raise dialog('The value for "lineObjectNumber" cannot be modified.')
        fields = dict(old)
        if any(name in values for name in ("lineObjectNumber", "itemId", "accountId", "lineType")):
            self._apply_line_object(company, self.row(company, "salesInvoices", old["documentId"]).fields, fields,
                                    values)
        fields.update({k: v for k, v in values.items() if k not in ("itemId", "accountId", "lineType",
                                                                     "lineObjectNumber")})
        _line_amounts(fields, "discountAmount" in values)
        row = self._put(company, "salesInvoiceLines", fields["id"], fields)
        self._recalculate(company, fields["documentId"])
        return row

    def delete_line(self, company: Company, row: Row) -> None:
        invoice_id = row.fields["documentId"]
        self._draft(company, invoice_id)
        self._journal.set(company.lines_of[invoice_id], row.fields["id"], MISSING)
        self._journal.set(company.tables["salesInvoiceLines"], row.fields["id"], MISSING)
        self.set_dimension_set(company, row.fields["id"], {})
        self._recalculate(company, invoice_id)

    def lines(self, company: Company, invoice_id: str) -> list[Row]:
        rows = [company.tables["salesInvoiceLines"][i] for i in company.lines_of.get(invoice_id, {})]
        return sorted(rows, key=lambda row: row.fields["sequence"])


QUANTITY_PRECISION = Decimal("0.00001")
TOTALS = ("totalAmountExcludingTax", "totalTaxAmount", "totalAmountIncludingTax", "remainingAmount")


def _line_amounts(fields: dict[str, Any], amount_given: bool) -> None:
    """Line amounts (no tax in the simulated company); a discount percent wins unless the request
    set the discount amount itself."""
    if fields["lineType"] == "Comment":
        fields.update(quantity=Decimal(0), unitPrice=Decimal(0))
    # SalesLine Quantity OnValidate: UOMMgt.RoundAndValidateQty, to 0.00001 when the unit has no precision.
    fields["quantity"] = fields["quantity"].quantize(QUANTITY_PRECISION, ROUND_HALF_UP)
    gross = fields["quantity"] * fields["unitPrice"]
    if fields["discountPercent"] and not amount_given:
        fields["discountAmount"] = money(gross * fields["discountPercent"] / 100)
    amount = money(gross - fields["discountAmount"])
    fields.update(amountExcludingTax=amount, taxPercent=Decimal(0), totalTaxAmount=Decimal(0),
                  amountIncludingTax=amount, invoiceDiscountAllocation=Decimal(0), netAmount=amount,
                  netTaxAmount=Decimal(0), netAmountIncludingTax=amount)
