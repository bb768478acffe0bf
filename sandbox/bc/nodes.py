"""The node limit BC's OData layer puts on a `$filter`, counted as ASP.NET OData counts it.

BC validates query options with ASP.NET OData's validators and the default
`ODataValidationSettings.MaxNodeCount` of 100. `FilterQueryValidator.ValidateQueryNode` counts
every node of the *bound* filter (Microsoft.OData.Core's semantic tree) before it visits it, and
throws at the 101st: "The node count limit of '100' has been exceeded. To increase the limit, set
the 'MaxNodeCount' property on EnableQueryAttribute or ODataValidationSettings."

The bound tree has a node for each binary operator (`and`/`or` chains are left-deep, so n operands
make n-1 nodes), `not`, function call, constant, and for each property access two: the
`SingleValuePropertyAccessNode` and the range variable `$it` it is read from (the validator visits
`Source`). Binding also inserts a `ConvertNode` where an operand's type differs from the signature
the operator or function is bound to (`MetadataBindingUtils.ConvertToTypeIfNeeded`); type
references with different facets are not equivalent (`EdmElementComparer`). Which operands get
one depends on the facets BC's `$metadata` gives a property, which are not documented; the
strictest plausible reading (`FilterRules.count_conversions`, the default) counts one for:

- a text property (`Edm.String` with `MaxLength`) under a comparison or a function: the
  signatures take an unbounded `Edm.String`;
- a decimal property (`Edm.Decimal` with `Scale`) under a comparison, and a number literal or
  `null` compared with a property.

With `count_conversions=False` none is counted (a model without facets). Sources:
OData/WebApi `src/Microsoft.AspNet.OData.Shared/Query/Validators/FilterQueryValidator.cs`
(`IncrementNodeCount`), `ODataValidationSettings.cs` (`_maxNodeCount = 100`), its test
`FilterQueryValidatorTest.GetLongInputsTestData` (21 × `SupplierID eq 1` joined by `and` exceed
100 nodes, 20 do not: 4 nodes a comparison of an int property with an int); OData/odata.net
`MetadataBindingUtils.ConvertToTypeIfNeeded`, `EdmElementComparer.IsEquivalentTo`.
"""

from __future__ import annotations

from sandbox.bc.odata import EntityType, FilterRules
from sandbox.bc.odata_syntax import CODE, NUMBER, STRING, Call, Compare, Literal, Logical, Not, ODataError, Property

MESSAGE = ("The node count limit of '{limit}' has been exceeded. To increase the limit, set the 'MaxNodeCount' "
           "property on EnableQueryAttribute or ODataValidationSettings.")


class NodeLimitExceeded(ODataError):
    """ASP.NET OData's `ODataException`, answered 400 (the code BC gives it is not documented)."""


def count(node, entity: EntityType, rules: FilterRules) -> int:
    """The nodes of the bound filter, as the validator counts them."""
    return _count(node, entity, rules, parent=None)


def check(node, entity: EntityType, rules: FilterRules) -> None:
    if rules.max_nodes is not None and count(node, entity, rules) > rules.max_nodes:
        raise NodeLimitExceeded(MESSAGE.format(limit=rules.max_nodes))


def _converted(node, entity: EntityType, parent) -> bool:
    """Whether binding wraps `node`, an operand of `parent`, in a ConvertNode (strict reading)."""
    if isinstance(node, Property) and isinstance(parent, (Compare, Call)):
        kind = entity.type_of(node.name)
        if kind in (STRING, CODE):
            return node.name in entity.lengths
        return kind == NUMBER and isinstance(parent, Compare)
    if isinstance(node, Literal) and isinstance(parent, Compare):
        return node.kind in (NUMBER, "null")
    return False


def _count(node, entity: EntityType, rules: FilterRules, parent) -> int:
    extra = 1 if rules.count_conversions and _converted(node, entity, parent) else 0
    if isinstance(node, Logical):
        return extra + len(node.operands) - 1 + sum(_count(o, entity, rules, node) for o in node.operands)
    if isinstance(node, Not):
        return extra + 1 + _count(node.operand, entity, rules, node)
    if isinstance(node, Compare):
        return extra + 1 + _count(node.left, entity, rules, node) + _count(node.right, entity, rules, node)
    if isinstance(node, Call):
        return extra + 1 + sum(_count(a, entity, rules, node) for a in node.args)
    if isinstance(node, Property):
        entity.type_of(node.name)
        return extra + 2
    return extra + 1
