"""Switches for the behaviours BC's documentation leaves open.

Each default is the strictest reading (the one that makes a careless client fail here rather
than in production); the other value is the variant a test can opt into. `BcSimulator.configure`
changes them at run time. The latency, limits and faults of the HTTP layer are `sandbox.faults.Knobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.bc.odata import FilterRules


@dataclass
class BcOptions:
    code_filter_uppercases_literal: bool = False
    """Docs silent. False: a literal compared with a Code field is used as sent, so
    ``externalDocumentNumber eq 'bk-1'`` does not find ``BK-1``. True: BC upper-cases it first."""
    case_functions_ignore_case: bool = False
    """Docs: "tolower and toupper disable case sensitivity in comparisons". False (OData): the
    function applies to the field's value and the literal is compared as sent, so only a
    lower-case literal matches ``tolower(email)``. True: any literal's case matches."""
    nested_functions_need_schema_2_1: bool = True
    """Docs: nested calls are supported from ``$schemaversion=2.1``; before, they "throw an error or
    return an undefined result". True: not supported without ``$schemaversion=2.1`` (what then
    happens: `nested_functions_without_2_1`). False: allowed."""
    nested_functions_without_2_1: str = "empty"
    """What a nested call gets where it is not supported ("either throws an error or returns an
    undefined result"): ``"empty"`` (strictest: 200 with nothing, as if no record matched),
    ``"unfiltered"`` (200 with every record) or ``"error"`` (400)."""
    refuse_blocked_dimension_values: bool = False
    """Docs silent on what the API does with a blocked dimension value. False (the AL source of
    APIV2DimensionSetLines.Page.al, which only checks that the value exists): a draft takes it, and
    posting refuses it ("Dimension Value LOCATION - OSLO is blocked."). True: the dimension set
    line itself is refused with that message."""
    schema_version_2_1_honoured: bool = True
    """Docs: nested calls work "in ``$schemaversion=2.1`` and later" (written for OData web services;
    whether API pages honour the parameter is not stated). True: they do. False: the parameter is
    ignored, so nested calls are refused as without it."""
    filter_max_nodes: int | None = 100
    """ASP.NET OData's default ``MaxNodeCount``, which BC keeps (a filter of more nodes is refused
    with BC's message; `sandbox.bc.nodes`). None: no limit (what the simulator did before)."""
    filter_counts_conversions: bool = True
    """Undocumented: whether OData's binding inserts conversion nodes for BC's fields (their
    ``MaxLength``/``Scale`` facets). True counts them (strictest); False: a model without facets."""
    line_default_dims_override_header: bool = True
    """Docs silent (it depends on the company's Default Dimension Priorities for source code
    SALES, BASEAPP `DimensionManagement.GetDefaultDimID`): True, a new line takes its item's
    default value of a dimension the header already has (the item has a priority, the customer
    none or a lower one); False, the header's value stays (no priorities, or the customer's first)."""
    posted_invoice_keeps_number: bool = False
    """A company whose Posted Invoice Nos. is the same series as its Invoice Nos.: a posted
    invoice keeps its draft's number (BC's Sales Header `GetPostingNoSeriesCode`). False (a
    CRONUS-like setup): it gets the next posted number (PS-INV103001…). With True, a posted invoice
    (status ``Open``) looks exactly like a released draft through the API."""
    plus_in_query_is_space: bool = False
    """Docs silent on whether BC reads ``+`` in a query string as a space (HTML forms do; OData's
    URL conventions percent-encode a space as ``%20``). False (strictest): ``+`` is a plus sign,
    so ``$filter=city+eq+'Oslo'`` is a syntax error. True: a space."""
    deep_insert_answer_has_totals: bool = False
    """Docs silent on whether the answer to an invoice POST with `salesInvoiceLines` shows the totals
    its lines made. False (strictest): the totals as the header was inserted (0); True: as stored."""
    sales_tax: bool = False
    """A sales-tax (North American) company: BC then skips the sell-to customer's Gen. Bus. Posting
    Group check when an invoice is created. False: the check runs (as in W1 companies)."""

    def filter_rules(self, schema_version: str | None) -> FilterRules:
        nested = not self.nested_functions_need_schema_2_1 or (
            self.schema_version_2_1_honoured and _at_least_2_1(schema_version))
        return FilterRules(code_literals_upper=self.code_filter_uppercases_literal,
                           case_functions_ignore_case=self.case_functions_ignore_case, nested_functions=nested,
                           max_nodes=self.filter_max_nodes, count_conversions=self.filter_counts_conversions)


def parse_query(raw: str, plus_is_space: bool) -> dict[str, str]:
    """A query string's parameters, ``+`` read as `BcOptions.plus_in_query_is_space` says."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw if plus_is_space else raw.replace("+", "%2B"), keep_blank_values=True))


def _at_least_2_1(version: str | None) -> bool:
    try:
        major, _, minor = (version or "").strip().partition(".")
        return (int(major), int(minor or 0)) >= (2, 1)
    except ValueError:
        return False
