"""Config drift between the app, its local settings, its Azure infrastructure and its docs.

Pure file parsing (no Bicep CLI, no Azure). The list of settings lives in four places (the
pydantic model, local.settings.sample.json, infra/app/api.bicep, the README table) and these
tests keep them one set; they also check that the Bicep modules are wired to each other and pin
the security and alerting properties that the README's Deploy and Operate sections promise.

`main.parameters.json` is resolved here the way azd resolves it (`azd_parameter_values`), for an
unset and for an empty variable, and every value that reaches a parameter is checked against the
parameter's decorators and against the app's own settings model. The postprovision hook that adds
the federated identity credential is run against a stand-in `az`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings, setting_names
from shared.web.signing_keys import KEYS_CONTAINER
from shared.storage.store import CONTAINER

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BICEP_FILES = ["main.bicep", "app/api.bicep", "app/rbac.bicep", "app/alerts.bicep",
               "app/secret.bicep", "app/workbook.bicep"]

# Read only by the Functions host when it runs locally.
LOCAL_HOST_ONLY = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsFeatureFlags"}
# Read only by the Functions host and the Python worker in Azure.
AZURE_HOST_ONLY = {
    "AzureWebJobsStorage__credential",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY",
}
# The one setting of the app that Azure does not set: the identity-based
# AzureWebJobsStorage__accountName / __clientId replace the connection string.
NOT_SET_IN_AZURE = {"AzureWebJobsStorage"}

# Set in Azure from the deployed resources, or from a parameter through an expression.
DERIVED_IN_AZURE = {
    "AzureWebJobsStorage__accountName": None,
    "AzureWebJobsStorage__clientId": None,
    "AZURE_CLIENT_SECRET": "entraClientSecret",  # → Key Vault secret → Key Vault reference
    "AZURE_FEDERATED_IDENTITY_CLIENT_ID": None,  # the managed identity's client id, unless a secret
}
# Simulator URLs locally; in Azure the real endpoints, i.e. the app's own defaults.
REAL_ENDPOINTS = {"AZURE_AUTHORITY_HOST", "GRAPH_BASE_URL", "BC_BASE_URL"}
# Identify things in your tenant, so no sample value is right: the deployment's tenant, or no
# default at all (azd asks).
TENANT_SPECIFIC = {"AZURE_TENANT_ID": "tenant().tenantId", "AZURE_CLIENT_ID": None,
                   "BC_COMPANY_ID": None, "BOOKINGS_BUSINESS_IDS": None}

FALLBACKS = {"PAGES_REDIRECT_URI": "https://func-api-abc.azurewebsites.net/api/pages/signin/callback"}
"""What api.bicep puts in place of an empty parameter, where the app checks the value's form."""

ALERTED_EVENTS = {"sync_run_finished", "message_poisoned", "invoice_job_part_failed"}
POISON_QUEUES = {"directory-upserts-poison", "invoice-jobs-poison", "sync-requests-poison", "sync-businesses-poison"}


# --- Bicep, just enough of it ------------------------------------------------------------------

def mask(text: str) -> str:
    """`text` with comments and the literal text of strings blanked out (same length, same line
    breaks). Interpolations `${…}` stay, their braces balanced, so every brace, bracket and colon
    left is Bicep syntax and every identifier left is a real reference."""
    out, n = list(text), len(text)

    def blank(start: int, end: int) -> None:
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "

    def skip_string(i: int) -> int:  # i at the opening quote → index after the closing one
        if text.startswith("'''", i):
            end = text.find("'''", i + 3)
            end = n if end < 0 else end + 3
            blank(i + 3, end - 3)
            return end
        j = literal = i + 1
        while j < n and text[j] != "'":
            if text[j] == "\\":
                j += 2
            elif text.startswith("${", j):
                blank(literal, j)
                j = literal = skip_interpolation(j + 2)
            else:
                j += 1
        blank(literal, min(j, n))
        return j + 1

    def skip_interpolation(j: int) -> int:  # j just inside `${` → index after its `}`
        depth = 1
        while j < n and depth:
            if text[j] == "'":
                j = skip_string(j)
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        return j

    i = 0
    while i < n:
        if text.startswith("//", i) or text.startswith("/*", i):
            line = text.startswith("//", i)
            end = text.find("\n" if line else "*/", i + 2)
            end = n if end < 0 else end + (0 if line else 2)
            blank(i, end)
            i = end
        elif text[i] == "'":
            i = skip_string(i)
        else:
            i += 1
    return "".join(out)


class Bicep:
    """One .bicep file: its source, and the same source masked for finding structure in."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.masked = mask(self.text)

    def params(self) -> dict[str, str | None]:
        """Declared parameters → default (source text), or None when there is none."""
        return {m.group(1): self.text[m.start(3):m.end(3)].strip() if m.group(2) else None
                for m in re.finditer(r"^[ \t]*param[ \t]+(\w+)[ \t]+[^=\n]+?(=[ \t]*(.*))?$",
                                     self.masked, re.MULTILINE)}

    def param_types(self) -> dict[str, str]:
        return dict(re.findall(r"^[ \t]*param[ \t]+(\w+)[ \t]+(\w+)", self.masked, re.MULTILINE))

    def decorators(self) -> dict[str, dict[str, str]]:
        """Parameter → its decorators (`@minValue(1)` → {"minValue": "1"}), argument source text."""
        lines, masked = self.text.split("\n"), self.masked.split("\n")
        found: dict[str, dict[str, str]] = {}
        pending: dict[str, str] = {}
        k = 0
        while k < len(lines):
            line = masked[k].strip()
            if line.startswith("@"):
                start, depth = k, masked[k].count("(") - masked[k].count(")")
                while depth > 0:
                    k += 1
                    depth += masked[k].count("(") - masked[k].count(")")
                source = "\n".join(lines[start:k + 1]).strip()
                name = re.match(r"@(\w+)", source).group(1)
                pending[name] = source[source.index("(") + 1:source.rindex(")")].strip()
            elif m := re.match(r"param[ \t]+(\w+)", line):
                found[m.group(1)] = pending
                pending = {}
            elif line:  # anything else (an output, a resource) ends the decorators; comments do not
                pending = {}
            k += 1
        return found

    def allowed(self, param: str) -> list[str | int] | None:
        argument = self.decorators().get(param, {}).get("allowed")
        if argument is None:
            return None
        return [string_literal(m.group(0)) if m.group(0).startswith("'") else int(m.group(0))
                for m in re.finditer(r"'(?:[^'\\]|\\.)*'|-?\d+", argument)]

    def object_at(self, brace: int) -> tuple[int, int]:
        """(start, end) of the body of the object whose `{` is at index `brace`."""
        depth = 0
        for k in range(brace, len(self.masked)):
            depth += {"{": 1, "}": -1}.get(self.masked[k], 0)
            if depth == 0:
                return brace + 1, k
        raise AssertionError(f"{self.path.name}: unbalanced braces")

    def object_after(self, pattern: str, start: int = 0, end: int | None = None):
        """Body of the first object that opens at or after a match of `pattern`."""
        m = re.compile(pattern, re.MULTILINE).search(self.masked, start, end or len(self.masked))
        assert m, f"{self.path.name}: nothing matches {pattern!r}"
        return self.object_at(self.masked.index("{", m.start()))

    def entries(self, body: tuple[int, int]) -> dict[str, str]:
        """Top-level `key: value` lines of an object body → value (source text of that line)."""
        found, depth = {}, 0
        offset = body[0]
        for line in self.masked[body[0]:body[1]].split("\n"):
            m = re.match(r"[ \t]*'?([\w.-]+)'?[ \t]*:", line)
            if depth == 0 and m:
                found[m.group(1)] = self.text[offset + m.end():offset + len(line)].strip()
            depth += sum(line.count(c) for c in "{[") - sum(line.count(c) for c in "}]")
            offset += len(line) + 1
        return found

    def var_object_keys(self, name_pattern: str) -> set[str]:
        """Keys of the object literals a `var` matching the pattern is built from, including
        both branches of a condition (`cond ? {} : { KEY: … }`)."""
        keys: set[str] = set()
        for m in re.finditer(rf"^var[ \t]+{name_pattern}[ \t]*=", self.masked, re.MULTILINE):
            following = re.search(r"^\S", self.masked[m.end():], re.MULTILINE)
            stop = m.end() + following.start() if following else len(self.masked)
            at = self.masked.find("{", m.end(), stop)
            while at >= 0:
                body = self.object_at(at)
                keys |= set(self.entries(body))
                at = self.masked.find("{", body[1] + 1, stop)
        return keys

    def module(self, name: str) -> tuple[str, dict[str, str]]:
        """(path, params) of `module <name> '<path>' = … { params: { … } }`."""
        m = re.search(rf"^module[ \t]+{name}[ \t]+'([^']*)'", self.text, re.MULTILINE)
        assert m, f"{self.path.name}: no module {name}"
        body = self.object_at(self.masked.index("{", m.end()))
        return m.group(1), self.entries(self.object_after(r"^[ \t]*params[ \t]*:", *body))

    def local_modules(self) -> dict[str, Path]:
        return {m.group(1): (self.path.parent / m.group(2)).resolve() for m in re.finditer(
            r"^module[ \t]+(\w+)[ \t]+'([\w./-]+\.bicep)'", self.text, re.MULTILINE)}


def bicep(relative: str) -> Bicep:
    return Bicep(INFRA / relative)


def string_literal(expression: str | None) -> str | None:
    m = re.fullmatch(r"'((?:[^'\\]|\\.)*)'", expression or "")
    return m.group(1).replace("\\'", "'") if m else None


def sample_values() -> dict[str, str]:
    return json.loads((ROOT / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]


def app_default(alias: str):
    return next(info.default for info in Settings.model_fields.values() if info.alias == alias)


def test_every_bicep_file_parses_with_an_outside_parser():
    """pycep-parser, the Bicep parser checkov's Bicep checks run on: a syntax error, or something
    it cannot read (a comment inside an object literal, in this version), fails here rather than
    leaving checkov blind to the file."""
    from pycep import BicepParser

    found = sorted(str(path.relative_to(INFRA)) for path in INFRA.rglob("*.bicep"))
    assert found == sorted(BICEP_FILES)
    parser = BicepParser()
    for relative in BICEP_FILES:
        tree = parser.parse(file_path=INFRA / relative)
        assert tree.get("parameters") or tree.get("resources"), relative


def test_the_outside_parser_catches_a_syntax_error(tmp_path):
    from lark.exceptions import LarkError
    from pycep import BicepParser

    broken = tmp_path / "broken.bicep"
    broken.write_text(bicep("app/secret.bicep").text.replace("properties: {", "properties: {{", 1), encoding="utf-8")
    with pytest.raises(LarkError):
        BicepParser().parse(file_path=broken)


def test_mask_hides_comments_and_literal_text_but_keeps_interpolations():
    source = "var a = { // {\n  b: '}x${c({ d: 'e}' })}'\n  /* } */ f: '''\n}''' }\n"
    masked = mask(source)
    assert len(masked) == len(source) and masked.count("\n") == source.count("\n")
    assert masked.count("{") == masked.count("}") == 3
    assert "${c({ d: '  ' })}" in masked
    assert "b:" in masked and "f:" in masked and "//" not in masked and "x" not in masked


# --- (a) one list of settings ------------------------------------------------------------------

def infra_setting_names() -> set[str]:
    """Every app setting api.bicep sets: the keys of its `var …Settings` objects."""
    return bicep("app/api.bicep").var_object_keys(r"\w*Settings")


def readme_setting_names() -> set[str]:
    """Names in backticks in the first column of the table under README.md's Settings heading."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    heading = next((k for k, line in enumerate(lines) if re.match(r"#+ .*Settings", line)), None)
    assert heading is not None, "README.md has no heading containing 'Settings'"
    names: set[str] = set()
    for line in lines[heading + 1:]:
        if line.startswith("#") or (names and line.strip() and not line.lstrip().startswith("|")):
            break
        if line.lstrip().startswith("|"):
            first_cell = line.strip().strip("|").split("|")[0]
            names |= set(re.findall(r"`([A-Za-z_]\w*)`", first_cell))
    assert names, "README.md: no settings table under the Settings heading"
    return names


def test_local_settings_sample_lists_every_setting_the_app_reads():
    assert set(sample_values()) - LOCAL_HOST_ONLY == set(setting_names())


def test_infra_sets_every_setting_the_app_reads_and_no_other():
    infra = infra_setting_names()
    assert AZURE_HOST_ONLY <= infra, "host settings missing from api.bicep"
    assert not infra & NOT_SET_IN_AZURE, "AzureWebJobsStorage must stay identity-based in Azure"
    assert (infra - AZURE_HOST_ONLY) | NOT_SET_IN_AZURE == set(setting_names())


def test_readme_settings_table_lists_every_setting_the_app_reads():
    assert readme_setting_names() == set(setting_names())


def wired_parameter(expression: str) -> tuple[str, bool]:
    """(parameter, whether an empty value falls back to something else) of an app setting's
    expression in api.bicep: `param`, or `empty(param) ? <fallback> : param`."""
    m = re.fullmatch(r"empty\((\w+)\) \? .+ : (\w+)", expression)
    if m and m.group(1) == m.group(2):
        return m.group(1), True
    return expression, False


def setting_parameters() -> dict[str, str]:
    """Setting → the main.bicep parameter it comes from (for those that come from one)."""
    api, main = bicep("app/api.bicep"), bicep("main.bicep")
    wiring = api.entries(api.object_after(r"^var[ \t]+appSettings[ \t]*="))
    _, passed = main.module("api")
    mapping = {name: param for name, param in DERIVED_IN_AZURE.items() if param}
    for name, expression in wiring.items():
        if name in DERIVED_IN_AZURE:
            continue
        api_param, _ = wired_parameter(expression)
        assert api_param in api.params(), f"{name} is set from {expression}, not from a parameter"
        assert passed.get(api_param) in main.params(), f"{name}: main.bicep passes no parameter"
        mapping[name] = passed[api_param]
    return mapping


def settings_with_empty_fallback() -> set[str]:
    """Settings that api.bicep replaces with something else when their parameter is empty."""
    api = bicep("app/api.bicep")
    wiring = api.entries(api.object_after(r"^var[ \t]+appSettings[ \t]*="))
    return {name for name, expression in wiring.items() if wired_parameter(expression)[1]}


def test_every_app_setting_is_a_parameter_with_the_local_default():
    """Defaults in Azure are local.settings.sample.json's, except the documented differences."""
    defaults, sample = bicep("main.bicep").params(), sample_values()
    mapping = setting_parameters()
    assert set(mapping) == set(setting_names()) - NOT_SET_IN_AZURE - {
        name for name, param in DERIVED_IN_AZURE.items() if not param}
    for name, param in mapping.items():
        default = defaults[param]
        if name in REAL_ENDPOINTS:
            assert string_literal(default) == app_default(name), name
        elif name in TENANT_SPECIFIC:
            assert default == TENANT_SPECIFIC[name], name
        else:
            assert string_literal(default) == sample[name], f"{name}: {default} is not the sample's"


def test_azd_environment_variables_are_named_after_the_settings():
    """`azd env set BC_COMPANY_ID …` sets BC_COMPANY_ID; AZURE_* become ENTRA_* so they cannot
    be mistaken for the credentials of azd or the Azure CLI themselves."""
    variables = parameter_variables()
    for name, param in setting_parameters().items():
        assert variables[param] == re.sub(r"^AZURE_", "ENTRA_", name), name


# --- (b) the modules fit together and are locked down ------------------------------------------

@pytest.mark.parametrize("relative", BICEP_FILES)
def test_local_modules_get_exactly_the_parameters_they_declare(relative):
    file = bicep(relative)
    for module, path in file.local_modules().items():
        declared = Bicep(path).params()
        _, passed = file.module(module)
        assert set(passed) <= set(declared), f"{module}: undeclared {set(passed) - set(declared)}"
        required = {name for name, default in declared.items() if default is None}
        assert required <= set(passed), f"{module}: missing {required - set(passed)}"


@pytest.mark.parametrize("relative", BICEP_FILES)
def test_every_declared_parameter_is_used(relative):
    file = bicep(relative)
    for name in file.params():
        uses = re.findall(rf"(?<![\w.]){name}(?!\w)", file.masked)
        assert len(uses) >= 2, f"{relative}: parameter {name} is never used"


def test_parameters_file_matches_main_bicep():
    """Each parameter maps to one variable. A parameter whose default is a non-empty literal repeats
    it as `${VAR=default}` (the same value: an empty variable then means the default too, as it does
    for the parameters whose default is empty); the others are a plain `${VAR}`."""
    main = bicep("main.bicep")
    declared, types, given = main.params(), main.param_types(), parameters_file()
    assert set(given) <= set(declared), f"not in main.bicep: {set(given) - set(declared)}"
    required = {name for name, default in declared.items() if default is None}
    assert required <= set(given), f"azd cannot map {required - set(given)}"
    for name, entry in given.items():
        m = re.fullmatch(r"\$\{([A-Z][A-Z0-9_]*)(?:=([^${}]*))?\}", entry["value"])
        assert m, f"{name}: {entry['value']} is not ${{VAR}} or ${{VAR=default}}"
        default = declared[name]
        literal = default if types[name] == "int" else string_literal(default)
        if literal not in (None, ""):
            assert m.group(2) == literal, f"{name}: the parameters file's default {m.group(2)!r} is not {default}"
        else:
            assert m.group(2) is None, f"{name}: main.bicep's default is {default}; no default here"


# --- (b2) azd resolves the parameters file ------------------------------------------------------
#
# azd (cli/azd/pkg/infra/provisioning/bicep/bicep_provider.go, loadParameters / ensureParameters /
# armParameterFileValue) runs github.com/drone/envsubst v1.0.3 over each parameter of
# main.parameters.json separately. Looking a variable up reads the azd environment (.env), then the
# process environment. `${VAR=default}`, `${VAR:=default}` and `${VAR:-default}` all give the
# default when the value is empty, whether set or unset (envsubst's toDefault). Since azd 1.15.0
# (azure-dev #5061) a string parameter that comes out empty because a variable is unset is left
# out, so Bicep's default applies; an empty but *set* variable is sent as "" (unless the
# parameter's default is "" too). Numbers and booleans arrive as strings and are converted; an
# empty or unparsable one is left out. A required parameter left out is prompted for.

PRINCIPAL = "00000000-0000-0000-0000-0000000000a1"  # azd fills AZURE_PRINCIPAL_ID itself
AZD_MANAGED = {"AZURE_ENV_NAME", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID"}
REQUIRED_VALUES = {"AZURE_ENV_NAME": "bookings-prod", "AZURE_LOCATION": "westeurope",
                   "BC_COMPANY_ID": "00000000-0000-0000-0000-0000000000bc",
                   "BOOKINGS_BUSINESS_IDS": "contoso@contoso.onmicrosoft.com",
                   "ENTRA_CLIENT_ID": "00000000-0000-0000-0000-0000000000c1"}
DEFAULT, PROMPT = "<main.bicep default>", "<azd prompts>"


def parameters_file() -> dict[str, dict]:
    return json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]


def parameter_variables() -> dict[str, str]:
    """Parameter → the variable it is mapped to."""
    return {name: re.match(r"\$\{([A-Z0-9_]+)", entry["value"]).group(1) for name, entry in parameters_file().items()}


class EnvsubstError(ValueError):
    pass


def envsubst(text: str, lookup) -> str:
    """drone/envsubst v1.0.3 for the forms azd documents: ${VAR}, ${VAR=default}, ${VAR:=default},
    ${VAR:-default} (defaults may nest ${…}). Other operators are not supported here (and `${VAR-x}`
    is a syntax error there): they raise."""
    out, k = [], 0
    while (start := text.find("${", k)) >= 0:
        out.append(text[k:start])
        value, k = _substitute(text, start + 2, lookup)
        out.append(value)
    return "".join(out) + text[k:]


def _substitute(text: str, k: int, lookup) -> tuple[str, int]:
    m = re.compile(r"\w+").match(text, k)
    if not m:
        raise EnvsubstError(f"bad substitution at {text[k - 2:k + 10]!r}")
    name, k = m.group(0), m.end()
    if text.startswith("}", k):
        return lookup(name), k + 1
    operator = next((op for op in (":=", ":-", "=") if text.startswith(op, k)), None)
    if operator is None:
        raise EnvsubstError(f"unsupported substitution at {text[k - len(name) - 2:k + 10]!r}")
    k += len(operator)
    default = []
    while not text.startswith("}", k):
        if k >= len(text):
            raise EnvsubstError("missing closing brace")
        if text.startswith("${", k):
            value, k = _substitute(text, k + 2, lookup)
            default.append(value)
        else:
            default.append(text[k])
            k += 1
    return lookup(name) or "".join(default), k + 1


def test_envsubst_follows_drone_envsubst():
    env = {"SET": "x", "EMPTY": ""}
    lookup = lambda name: env.get(name, "")  # noqa: E731
    assert envsubst("${SET}|${EMPTY}|${UNSET}", lookup) == "x||"
    for operator in ("=", ":=", ":-"):
        assert envsubst(f"${{SET{operator}d}}|${{EMPTY{operator}d}}|${{UNSET{operator}d}}", lookup) == "x|d|d"
    assert envsubst("${UNSET=0 */15 * * * *}", lookup) == "0 */15 * * * *"
    assert envsubst("${UNSET=https://a.b/c}", lookup) == "https://a.b/c"
    assert envsubst("${UNSET=${SET}y}", lookup) == "xy"
    for bad in ("${UNSET-d}", "${UNSET:+d}", "${}", "${UNSET=d"):
        with pytest.raises(EnvsubstError):
            envsubst(bad, lookup)


def arm_parameter_file_value(param_type: str, value, default: str | None):
    """azd's armParameterFileValue: the value azd sends, or None when it leaves the parameter out
    (its default applies, or azd prompts for a required one)."""
    if not isinstance(value, str):
        return value
    if param_type == "int":
        return int(value) if re.fullmatch(r"[+-]?\d+", value) else None
    if param_type == "bool":
        truth = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
                 "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
        return truth.get(value)
    if value:
        return value
    # An empty string is sent only when the default is a string other than "" (an expression
    # such as tenant().tenantId compiles to the string "[tenant().tenantId]").
    return value if default is not None and string_literal(default) != "" and not default.isdigit() else None


def azd_parameter_values(env: dict[str, str]) -> dict[str, object]:
    """Parameter → what azd does with it for this azd environment: the value it sends, DEFAULT
    (left out: main.bicep's default applies) or PROMPT (left out, no default: azd asks)."""
    main = bicep("main.bicep")
    defaults, types = main.params(), main.param_types()
    resolved: dict[str, object] = {}
    for name, entry in parameters_file().items():
        unset = False

        def lookup(variable: str) -> str:
            nonlocal unset
            if variable == "AZURE_PRINCIPAL_ID":
                return PRINCIPAL
            if variable not in env:
                unset = True
            return env.get(variable, "")

        value = json.loads(envsubst(json.dumps(entry), lookup)).get("value")
        if value is None or (value == "" and unset):
            sent = None
        else:
            sent = arm_parameter_file_value(types[name], value, defaults[name])
        resolved[name] = sent if sent is not None else (DEFAULT if defaults[name] is not None else PROMPT)
    return resolved


def effective_value(param: str, resolved: object):
    """The value the parameter has in the deployment (a literal default filled in)."""
    main = bicep("main.bicep")
    if resolved is not DEFAULT:
        return resolved
    default = main.params()[param]
    if main.param_types()[param] == "int":
        return int(default)
    literal = string_literal(default)
    return literal if literal is not None else f"<{default}>"  # an expression: not empty


def problems_with(values: dict[str, object]) -> list[str]:
    """What Bicep would refuse, or what would give the app an empty or invalid setting."""
    from shared.settings import Settings

    main = bicep("main.bicep")
    decorators, defaults = main.decorators(), main.params()
    found = []
    for param, resolved in values.items():
        if resolved is PROMPT:
            if defaults[param] is None:
                continue  # a required parameter: azd asks, and the decorators apply to the answer
            found.append(f"{param}: azd would prompt")
            continue
        value = effective_value(param, resolved)
        rules = decorators.get(param, {})
        allowed = main.allowed(param)
        if allowed is not None and value not in allowed:
            found.append(f"{param}: {value!r} is not one of {allowed}")
        if "minValue" in rules and not (isinstance(value, int) and value >= int(rules["minValue"])):
            found.append(f"{param}: {value!r} < {rules['minValue']}")
        if "maxValue" in rules and not (isinstance(value, int) and value <= int(rules["maxValue"])):
            found.append(f"{param}: {value!r} > {rules['maxValue']}")
        if "minLength" in rules and len(str(value)) < int(rules["minLength"]):
            found.append(f"{param}: {value!r} is shorter than {rules['minLength']}")
    # The app settings that come out of it: non-empty where the app's default is not empty, and
    # valid for the app's settings model.
    fallback = settings_with_empty_fallback()
    settings = {}
    for setting, param in setting_parameters().items():
        if param == "entraClientSecret":
            continue  # becomes a Key Vault reference, or no setting at all
        value = values[param]
        value = REQUIRED_VALUES[parameter_variables()[param]] if value is PROMPT else effective_value(param, value)
        if value == "" and setting in fallback:
            value = FALLBACKS.get(setting, "<fallback>")
        if value == "" and (defaults[param] is None or string_literal(defaults[param]) != ""):
            found.append(f"{setting} would be empty ({param}: main.bicep's default is {defaults[param]})")
        settings[setting] = str(value).lower() if isinstance(value, bool) else str(value)
    settings["AZURE_TENANT_ID"] = "00000000-0000-0000-0000-000000000001"  # a GUID, not a placeholder
    try:
        Settings.model_validate({name: value for name, value in settings.items() if value != ""})
    except ValueError as error:
        found.append(f"the app refuses its settings: {error}")
    return found


def optional_variables() -> set[str]:
    return set(parameter_variables().values()) - AZD_MANAGED - set(REQUIRED_VALUES)


def test_unset_optional_variables_give_every_parameter_a_valid_value():
    values = azd_parameter_values(dict(REQUIRED_VALUES))
    assert problems_with(values) == []
    assert values["syncStalledAfter"] == "PT1H" and values["maximumInstanceCount"] == 40


def test_empty_optional_variables_give_every_parameter_a_valid_value():
    """`azd env set NAME ""` is a value, not "unset": no parameter may get an empty string it
    cannot take (allowed values, numbers, endpoints)."""
    values = azd_parameter_values(dict(REQUIRED_VALUES) | dict.fromkeys(optional_variables(), ""))
    assert problems_with(values) == []
    assert values["authorityHost"] == "https://login.microsoftonline.com"
    assert values["syncLookbackDays"] == "60" and values["instanceMemoryMB"] == 2048


@pytest.mark.parametrize("variable", sorted(optional_variables()))
def test_each_optional_variable_alone_empty(variable):
    assert problems_with(azd_parameter_values(dict(REQUIRED_VALUES) | {variable: ""})) == []


def test_required_variables_are_asked_for_not_sent_empty():
    for env in ({}, dict.fromkeys(REQUIRED_VALUES, "")):
        values = azd_parameter_values({"AZURE_ENV_NAME": "x", "AZURE_LOCATION": "westeurope"} | {
            name: value for name, value in env.items() if name not in AZD_MANAGED})
        assert {values[p] for p in ("bcCompanyId", "bookingsBusinessIds", "entraClientId")} == {PROMPT}


def test_a_set_variable_reaches_its_parameter():
    values = azd_parameter_values(dict(REQUIRED_VALUES) | {
        "SYNC_LOOKBACK_DAYS": "90", "MAXIMUM_INSTANCE_COUNT": "10", "SYNC_STALLED_AFTER": "P1D",
        "ENTRA_TENANT_ID": "00000000-0000-0000-0000-00000000000f", "SYNC_SCHEDULE": "0 0 * * * *"})
    assert problems_with(values) == []
    assert (values["syncLookbackDays"], values["maximumInstanceCount"], values["syncStalledAfter"]) == ("90", 10, "P1D")
    assert values["entraTenantId"] == "00000000-0000-0000-0000-00000000000f"
    assert values["syncSchedule"] == "0 0 * * * *"
    assert values["principalId"] == PRINCIPAL


def test_invalid_values_are_caught():
    """The checks above are not vacuous."""
    for env in ({"SYNC_STALLED_AFTER": "PT5M"}, {"MAXIMUM_INSTANCE_COUNT": "5000"},
                {"SYNC_LOOKBACK_DAYS": "lots"}, {"INSTANCE_MEMORY_MB": "1024"}):
        assert problems_with(azd_parameter_values(dict(REQUIRED_VALUES) | env)), env


def test_maximum_instance_count_has_flex_consumptions_bounds():
    """Flex Consumption: the maximum instance count is 1 to 1,000 ("Event-driven scaling in Azure
    Functions" → Limit scale-out, Flex Consumption plan; older versions of the page said 40)."""
    for relative in ("main.bicep", "app/api.bicep"):
        rules = bicep(relative).decorators()["maximumInstanceCount"]
        assert (rules["minValue"], rules["maxValue"]) == ("1", "1000"), relative
    assert bicep("main.bicep").allowed("instanceMemoryMB") == [512, 2048, 4096]


def test_storage_takes_no_shared_keys():
    _, storage = bicep("main.bicep").module("storage")
    assert storage["allowSharedKeyAccess"] == "false"
    assert storage["allowBlobPublicAccess"] == "false"
    assert storage["minimumTlsVersion"] == "'TLS1_2'"


def test_function_app_is_flex_python_https_only_tls12_without_ftp_or_basic_auth():
    api = bicep("app/api.bicep")
    path, site = api.module("api")
    assert path.startswith("br/public:avm/res/web/site:")
    assert site["httpsOnly"] == "true"
    site_config = api.entries(api.object_after(r"^[ \t]*siteConfig[ \t]*:"))
    assert site_config["minTlsVersion"] == "'1.2'"
    assert site_config["ftpsState"] == "'Disabled'"
    policies = api.text[api.text.index("basicPublishingCredentialsPolicies:"):
                        api.text.index("functionAppConfig:")]
    assert re.findall(r"name: '(\w+)'\s+allow: (\w+)", policies) == [("ftp", "false"),
                                                                        ("scm", "false")]
    runtime = api.entries(api.object_after(r"^[ \t]*runtime[ \t]*:"))
    assert runtime == {"name": "'python'", "version": "runtimeVersion"}
    assert api.params()["runtimeVersion"] == "'3.11'"
    _, plan = bicep("main.bicep").module("appServicePlan")
    assert re.search(r"name: 'FC1'\s+tier: 'FlexConsumption'", bicep("main.bicep").text)
    assert plan["reserved"] == "true"


def test_identity_gets_the_storage_monitoring_and_secret_roles():
    rbac = bicep("app/rbac.bicep").text
    for role in ("b7e6dc6d-f1e8-4753-8033-0f276bb0955b",   # Storage Blob Data Owner
                 "974c5e8b-45b9-4653-ba55-5f855dd0fb88",   # Storage Queue Data Contributor
                 "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",   # Storage Table Data Contributor
                 "3913510d-42f4-4e42-8a64-420c390055eb",   # Monitoring Metrics Publisher
                 "4633458b-17de-408a-b874-0445c86b69e6"):  # Key Vault Secrets User
        assert role in rbac
    operator = rbac[rbac.index("var storageRolesOfUser"):]
    operator = operator[:operator.index("]")]
    assert "Blob" not in operator, "no blob role on the whole account: the pages' signing keys are the app's alone"
    reader = rbac[rbac.index("resource userBookkeeping"):]
    assert "scope: bookkeeping\n" in reader[:reader.index("\n}")] and "roles.storageBlobDataReader" in reader, \
        "the operator can read the last sync run and the leases, in their container"
    assert "name: '${storageAccountName}/default/${bookkeepingContainerName}'" in rbac
    main = bicep("main.bicep")
    assert "var bookkeepingContainerName = 'bookings-invoicing'" in main.text and CONTAINER == "bookings-invoicing"
    assert "var pagesKeysContainerName = 'pages-keys'" in main.text and KEYS_CONTAINER == "pages-keys"
    containers = main.text[main.text.index("blobServices: {"):main.text.index("minimumTlsVersion")]
    assert "name: bookkeepingContainerName" in containers and "name: pagesKeysContainerName" in containers
    assert "pagesKeysContainerName" not in rbac, "nobody but the app's identity gets a role on the keys"
    _, vault = bicep("main.bicep").module("keyVault")
    assert vault["enableRbacAuthorization"] == "true"
    _, insights = bicep("main.bicep").module("monitoring")
    assert insights["disableLocalAuth"] == "true"


def test_the_app_is_the_app_registration_with_a_federated_credential_or_a_key_vault_secret():
    """AZURE_CLIENT_ID is always the app registration (azd asks for it). Without a secret the app
    signs in with a client assertion of the managed identity (AZURE_FEDERATED_IDENTITY_CLIENT_ID);
    with one, the secret is a Key Vault reference and the identity setting is empty."""
    api, main = bicep("app/api.bicep"), bicep("main.bicep")
    assert ("var clientSecretSettings = empty(clientSecretUri) ? {\n"
            "  AZURE_CLIENT_SECRET: ''\n"
            "} : {\n"
            "  AZURE_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${clientSecretUri}/)'\n"
            "}") in api.text, "without a secret the setting is written empty (the site module merges old settings)"
    wiring = api.entries(api.object_after(r"^var[ \t]+appSettings[ \t]*="))
    assert wiring["AZURE_CLIENT_ID"] == "entraClientId"
    assert wiring["AZURE_FEDERATED_IDENTITY_CLIENT_ID"] == "empty(clientSecretUri) ? identityClientId : ''"
    _, passed = main.module("api")
    assert passed["clientSecretUri"] == "empty(entraClientSecret) ? '' : clientSecret.outputs.secretUri"
    assert passed["identityClientId"] == "apiIdentity.outputs.clientId"
    assert main.params()["entraClientId"] is None and main.decorators()["entraClientId"]["minLength"] == "1"
    assert "keyVaultAccessIdentityResourceId: identityId" in api.text
    assert re.search(r"@secure\(\)\s+(?:@\w+\([^\n]*\)\s+)*param entraClientSecret string = ''",
                     main.masked)
    assert sample_values()["AZURE_CLIENT_SECRET"] == ""


def test_no_certificate_path_is_left():
    """Flex Consumption cannot load certificates: the setting is gone from the app and from infra."""
    files = [path for path in INFRA.rglob("*") if path.is_file()] + [ROOT / "azure.yaml", ROOT / "README.md"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "CERTIFICATE_PATH" not in text and "clientCertificatePath" not in text, path


# --- (b3) the postprovision hook adds the federated identity credential -------------------------

HOOKS = INFRA / "hooks"


def hook_config() -> dict:
    return yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))["hooks"]["postprovision"]


def test_postprovision_hook_runs_in_both_shells_and_stops_azd_when_it_fails():
    """azd's azure.yaml schema (schemas/v1.0/azure.yaml.json, definitions.hook): with both `posix`
    and `windows`, `run`/`shell`/`interactive`/`continueOnError` go inside each of them."""
    config = hook_config()
    assert set(config) == {"posix", "windows"}
    for platform, shell, suffix in (("posix", "sh", ".sh"), ("windows", "pwsh", ".ps1")):
        hook = config[platform]
        assert set(hook) == {"shell", "run", "interactive", "continueOnError"}, platform
        assert hook["shell"] == shell and hook["interactive"] is False and hook["continueOnError"] is False
        assert hook["run"].endswith(suffix) and (ROOT / hook["run"]).is_file(), hook["run"]


def hook_variables(text: str, powershell: bool) -> set[str]:
    pattern = r"\$env:([A-Z][A-Z0-9_]*)" if powershell else r"\$\{?([A-Z][A-Z0-9_]*)"
    return set(re.findall(pattern, text))


def test_hook_reads_what_azd_provision_writes_to_the_environment():
    outputs = set(re.findall(r"^output[ \t]+(\w+)", bicep("main.bicep").masked, re.MULTILINE))
    scripts = {platform: (ROOT / hook_config()[platform]["run"]).read_text(encoding="utf-8")
               for platform in ("posix", "windows")}
    posix, windows = hook_variables(scripts["posix"], False), hook_variables(scripts["windows"], True)
    assert posix == windows
    # AZURE_ENV_NAME is azd's own; ENTRA_CLIENT_SECRET is the variable the parameters file maps.
    assert "ENTRA_CLIENT_SECRET" in parameter_variables().values()
    assert posix - {"AZURE_ENV_NAME", "ENTRA_CLIENT_SECRET"} <= outputs, posix - outputs
    assert {"ENTRA_CLIENT_ID", "API_IDENTITY_PRINCIPAL_ID", "FEDERATED_CREDENTIAL_ISSUER"} <= posix
    main = bicep("main.bicep").text
    assert "output API_IDENTITY_PRINCIPAL_ID string = apiIdentity.outputs.principalId" in main
    assert "output FEDERATED_CREDENTIAL_ISSUER string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'" in main
    assert "output ENTRA_CLIENT_ID string = entraClientId" in main
    assert {"APP_REGISTRATION_TENANT_ID", "AZURE_TENANT_ID", "PAGES_APP_ROLE"} <= posix
    assert "output PAGES_APP_ROLE string = pagesAllowedRole" in main
    assert "output APP_REGISTRATION_TENANT_ID string = empty(entraTenantId) ? tenant().tenantId : entraTenantId" in main
    for text in scripts.values():
        assert "api://AzureADTokenExchange" in text
        for verb in ("list", "create", "update"):
            assert f"az ad app federated-credential {verb} --id" in text, verb


FAKE_AZ = r"""#!PYTHON
# Stands in for the Azure CLI: `az account show`, `az ad app show|update` (app roles, optional
# claims) and `az ad app federated-credential list|create|update`, against the app registration in
# $FAKE_AZ_STATE (JSON: credentials, appRoles, optionalClaims); every call is appended to $FAKE_AZ_LOG.
import json, os, re, sys
args = sys.argv[1:]
state = json.load(open(os.environ["FAKE_AZ_STATE"]))
def option(name):
    return args[args.index(name) + 1] if name in args else None
call = {"args": args}
if os.environ.get("FAKE_AZ_FAIL"):
    print("ERROR: Please run 'az login' to setup account.", file=sys.stderr); sys.exit(1)
if args[:2] == ["account", "show"]:
    assert option("--query") == "tenantId" and option("-o") == "tsv"
    print(os.environ["FAKE_AZ_TENANT"])
elif args[:3] == ["ad", "app", "show"]:
    query = option("--query")
    m = re.fullmatch(r"appRoles\[\?value=='([^']*)'\]\.value", query)
    if m:
        assert option("-o") == "tsv"
        print("\n".join(r["value"] for r in state["appRoles"] if r["value"] == m.group(1)))
    elif query == "appRoles":
        assert option("-o") == "json"
        print(json.dumps(state["appRoles"], indent=2))
    elif query == "optionalClaims.idToken[?name=='login_hint'].name":
        assert option("-o") == "tsv"
        print("\n".join(c["name"] for c in ((state.get("optionalClaims") or {}).get("idToken") or [])
                        if c["name"] == "login_hint"))
    elif query == ("{idToken: [optionalClaims.idToken || `[]`, [{name: 'login_hint', essential: `false`}]][], "
                   "accessToken: optionalClaims.accessToken || `[]`, saml2Token: optionalClaims.saml2Token || `[]`}"):
        # What JMESPath makes of it (checked with the jmespath package): the lists there are, login_hint added.
        assert option("-o") == "json"
        claims = state.get("optionalClaims") or {}
        print(json.dumps({"idToken": (claims.get("idToken") or []) + [{"name": "login_hint", "essential": False}],
                          "accessToken": claims.get("accessToken") or [], "saml2Token": claims.get("saml2Token") or []}))
    else:
        sys.exit("unexpected query: " + query)
elif args[:3] == ["ad", "app", "update"]:
    if "--optional-claims" in args:
        value = option("--optional-claims")
        assert value.startswith("@")
        call["optionalClaims"] = json.load(open(value[1:]))
    else:
        value = option("--app-roles")
        assert value.startswith("@")
        call["appRoles"] = json.load(open(value[1:]))
elif args[:4] == ["ad", "app", "federated-credential", "list"]:
    query = option("--query")
    m = re.fullmatch(r"\[\?issuer=='([^']*)' && subject=='([^']*)' && contains\(audiences, '([^']*)'\)\]\.name", query)
    n = re.fullmatch(r"\[\?name=='([^']*)'\]\.name", query)
    credentials = state["credentials"]
    if m:
        names = [c["name"] for c in credentials if (c["issuer"], c["subject"]) == m.group(1, 2) and m.group(3) in c["audiences"]]
    elif n:
        names = [c["name"] for c in credentials if c["name"] == n.group(1)]
    else:
        sys.exit("unexpected query: " + query)
    assert option("-o") == "tsv"
    print("\n".join(names))
elif args[:4] in (["ad", "app", "federated-credential", "create"], ["ad", "app", "federated-credential", "update"]):
    call["parameters"] = json.load(open(option("--parameters")))
else:
    sys.exit("unexpected az call: %s" % args)
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(json.dumps(call) + "\n")
"""

FAKE_AZD = r"""#!/bin/sh
echo "azd version $FAKE_AZD_VERSION (commit 0123456789abcdef)"
"""

ISSUER = "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001/v2.0"
TENANT_OF_APP = "00000000-0000-0000-0000-000000000001"
APP = "00000000-0000-0000-0000-0000000000c1"
IDENTITY = "00000000-0000-0000-0000-0000000000d1"
OTHER_ROLE = {"allowedMemberTypes": ["User"], "description": "Read reports", "displayName": "Reader",
              "id": "6a1e2f4b-0000-4000-8000-000000000001", "isEnabled": True, "value": "Reports.Read"}


def run_hook(tmp_path, existing: list[dict], roles: list[dict] | None = None, optional_claims: dict | None = None,
             **env: str):
    """Runs the POSIX hook with a stand-in `az` (and `azd`); returns (exit code, output, az calls)."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    az = bin_dir / "az"
    az.write_text(FAKE_AZ.replace("PYTHON", sys.executable, 1), encoding="utf-8")
    az.chmod(0o755)
    azd = bin_dir / "azd"
    azd.write_text(FAKE_AZD, encoding="utf-8")
    azd.chmod(0o755)
    (tmp_path / "state.json").write_text(json.dumps({"credentials": existing, "appRoles": roles or [],
                                                     "optionalClaims": optional_claims}), encoding="utf-8")
    log = tmp_path / "az.log"
    log.write_text("", encoding="utf-8")
    azd_env = {"AZURE_ENV_NAME": "bookings-prod", "ENTRA_CLIENT_ID": APP, "API_IDENTITY_PRINCIPAL_ID": IDENTITY,
               "FEDERATED_CREDENTIAL_ISSUER": ISSUER, "AZURE_TENANT_ID": TENANT_OF_APP,
               "APP_REGISTRATION_TENANT_ID": TENANT_OF_APP, "PAGES_APP_ROLE": "Invoicing.Operator",
               "FAKE_AZ_TENANT": TENANT_OF_APP, "FAKE_AZD_VERSION": "1.18.2"}
    process = subprocess.run(  # noqa: S603 - our own script
        ["/bin/sh", str(ROOT / hook_config()["posix"]["run"])], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "FAKE_AZ_STATE": str(tmp_path / "state.json"),
             "FAKE_AZ_LOG": str(log)} | {k: v for k, v in (azd_env | env).items() if v is not None})
    calls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    return process.returncode, process.stdout + process.stderr, calls


def credential_calls(calls: list[dict], verb: str | None = None) -> list[dict]:
    return [c for c in calls if c["args"][2] == "federated-credential" and (verb is None or c["args"][3] == verb)]


def role_updates(calls: list[dict]) -> list[dict]:
    return [c for c in calls if c["args"][:3] == ["ad", "app", "update"] and "--app-roles" in c["args"]]


def claims_updates(calls: list[dict]) -> list[dict]:
    return [c for c in calls if c["args"][:3] == ["ad", "app", "update"] and "--optional-claims" in c["args"]]


def test_hook_asks_for_login_hint_in_id_tokens_keeping_the_optional_claims_there_are(tmp_path):
    """Sign-out sends the ID token's login_hint back as logout_hint, so Entra does not ask which account."""
    there = {"idToken": [{"name": "email", "essential": False}], "accessToken": [{"name": "ipaddr"}], "saml2Token": []}
    code, output, calls = run_hook(tmp_path, [], optional_claims=there)
    assert code == 0, output
    [update] = claims_updates(calls)
    assert update["args"][3:5] == ["--id", APP]
    assert update["optionalClaims"] == {"idToken": [{"name": "email", "essential": False},
                                                    {"name": "login_hint", "essential": False}],
                                        "accessToken": [{"name": "ipaddr"}], "saml2Token": []}
    code, output, calls = run_hook(tmp_path, [], optional_claims=None)
    assert [c["name"] for c in claims_updates(calls)[0]["optionalClaims"]["idToken"]] == ["login_hint"]
    code, output, calls = run_hook(tmp_path, [], optional_claims=update["optionalClaims"], ENTRA_CLIENT_SECRET="s")
    assert code == 0 and claims_updates(calls) == [] and "already puts login_hint" in output


def test_hook_adds_the_credential_the_docs_describe(tmp_path):
    code, output, calls = run_hook(tmp_path, [])
    assert code == 0, output
    [create] = credential_calls(calls, "create")
    assert create["args"][4:6] == ["--id", APP]
    assert create["parameters"] == {
        "name": "bookings-invoicing-bookings-prod", "issuer": ISSUER, "subject": IDENTITY,
        "audiences": ["api://AzureADTokenExchange"],
        "description": "The function app's managed identity signs in as this app (azd environment bookings-prod)"}


def test_hook_updates_its_credential_when_the_identity_changed_without_renaming_it(tmp_path):
    old = {"name": "bookings-invoicing-bookings-prod", "issuer": ISSUER, "subject": "old-principal",
           "audiences": ["api://AzureADTokenExchange"]}
    code, output, calls = run_hook(tmp_path, [old])
    assert code == 0, output
    [update] = credential_calls(calls, "update")
    assert update["args"][update["args"].index("--federated-credential-id") + 1] == old["name"]
    assert update["parameters"]["subject"] == IDENTITY
    assert "name" not in update["parameters"], "a credential's name cannot change: the PATCH leaves it out"
    assert not credential_calls(calls, "create")


def test_hook_leaves_an_equivalent_credential_alone(tmp_path):
    by_hand = {"name": "added-in-the-portal", "issuer": ISSUER, "subject": IDENTITY,
               "audiences": ["api://AzureADTokenExchange"]}
    code, output, calls = run_hook(tmp_path, [by_hand])
    assert code == 0, output
    assert [c["args"][3] for c in credential_calls(calls)] == ["list"]
    assert "already trusts" in output


def test_hook_adds_no_credential_with_a_client_secret(tmp_path):
    code, output, calls = run_hook(tmp_path, [], ENTRA_CLIENT_SECRET="s3cr3t")
    assert code == 0 and credential_calls(calls) == []
    assert "s3cr3t" not in output


def test_hook_fails_azd_when_it_cannot_do_its_job(tmp_path):
    code, output, calls = run_hook(tmp_path, [], API_IDENTITY_PRINCIPAL_ID=None)
    assert code != 0 and not credential_calls(calls) and "API_IDENTITY_PRINCIPAL_ID" in output
    code, output, calls = run_hook(tmp_path, [], FAKE_AZ_FAIL="1")
    assert code != 0 and "az login" in output
    assert calls == []


def test_hook_refuses_an_app_registration_and_identity_in_different_tenants_and_says_what_to_do(tmp_path):
    other = "00000000-0000-0000-0000-0000000000e2"
    code, output, calls = run_hook(tmp_path, [], AZURE_TENANT_ID=other)
    assert code != 0 and not credential_calls(calls, "create")
    assert "same tenant" in output and other in output and "ENTRA_CLIENT_SECRET" in output
    code, output, _ = run_hook(tmp_path, [], AZURE_TENANT_ID=other, ENTRA_CLIENT_SECRET="s3cr3t")
    assert code == 0, "with a secret the identity's tenant does not matter"


def test_hook_needs_the_cli_signed_in_to_the_app_registrations_tenant(tmp_path):
    code, output, calls = run_hook(tmp_path, [], FAKE_AZ_TENANT="00000000-0000-0000-0000-0000000000e2")
    assert code != 0 and f"az login --tenant {TENANT_OF_APP}" in output
    assert [c["args"][:2] for c in calls] == [["account", "show"]]


def test_hook_defines_the_pages_app_role_next_to_the_roles_there_are(tmp_path):
    code, output, calls = run_hook(tmp_path, [], roles=[OTHER_ROLE])
    assert code == 0, output
    [update] = role_updates(calls)
    kept, added = update["appRoles"]
    assert kept == OTHER_ROLE, "the roles it had are kept"
    assert added["value"] == "Invoicing.Operator" and added["allowedMemberTypes"] == ["User"]
    assert added["isEnabled"] is True and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                                        added["id"])
    code, output, calls = run_hook(tmp_path, [], roles=[])
    [update] = role_updates(calls)
    assert [r["value"] for r in update["appRoles"]] == ["Invoicing.Operator"]


def test_hook_leaves_a_defined_role_alone_and_defines_none_for_every_member(tmp_path):
    defined = {**OTHER_ROLE, "value": "Invoicing.Operator", "id": "6a1e2f4b-0000-4000-8000-000000000002"}
    code, output, calls = run_hook(tmp_path, [], roles=[defined])
    assert code == 0 and not role_updates(calls)
    code, output, calls = run_hook(tmp_path, [], PAGES_APP_ROLE="*")
    assert code == 0 and not [c for c in calls if c["args"][:3] == ["ad", "app", "show"] and "appRoles" in c["args"][-3]]
    code, output, calls = run_hook(tmp_path, [], PAGES_APP_ROLE="Bad role'")
    assert code != 0 and "not an app role value" in output


def test_hook_refuses_an_azd_older_than_1_18_2(tmp_path):
    code, output, calls = run_hook(tmp_path, [], FAKE_AZD_VERSION="1.18.1")
    assert code != 0 and "1.18.2" in output and calls == []
    for newer in ("1.18.2", "1.19.0", "2.0.0"):
        assert run_hook(tmp_path, [], FAKE_AZD_VERSION=newer)[0] == 0, newer


def test_azd_itself_refuses_a_version_that_would_upload_local_settings():
    """azd reads `.funcignore` (so local.settings.json and node_modules stay out of the package)
    from 1.18.0, and falls back from pwsh only from 1.18.2: azure.yaml's requiredVersions makes an
    older azd refuse the project ("the project fails to load")."""
    config = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert config["requiredVersions"] == {"azd": ">= 1.18.2"}
    ignored = (ROOT / ".funcignore").read_text(encoding="utf-8").split()
    assert "local.settings.json" in ignored and "node_modules" in ignored


def test_the_windows_hook_does_what_the_posix_one_does():
    """pwsh is not installed here: its twin is checked for the same steps."""
    text = (ROOT / hook_config()["windows"]["run"]).read_text(encoding="utf-8")
    assert "$PSVersionTable.PSVersion.Major -lt 7" in text, "PowerShell 7 is required"
    assert "[version]'1.18.2'" in text
    assert "az account show --query tenantId -o tsv" in text and "az login --tenant" in text
    assert "same tenant" in text and "$appTenant -ne $identityTenant" in text
    update = text[text.index("if ($mine) {"):text.index("else {", text.index("if ($mine) {"))]
    assert "$credential | ConvertTo-Json" in update and "name =" not in update, "no name in the PATCH body"
    assert "az ad app update --id $app --app-roles" in text and "$roles +=" in text
    assert "optionalClaims.idToken[?name=='login_hint'].name" in text and "name = 'login_hint'" in text
    assert "az ad app update --id $app --optional-claims" in text


def test_readme_says_which_azd_powershell_and_roles_the_hook_needs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "azd 1.18.2 or later" in readme and "PowerShell 7" in readme
    assert "Application Developer (for applications they own)" in readme
    assert "Application Developer or" not in readme


# --- (b4) the workbook ---------------------------------------------------------------------------

def test_workbook_is_linked_to_application_insights_with_a_stable_name():
    workbook = bicep("app/workbook.bicep")
    text = workbook.text
    assert "resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {" in text
    body = workbook.entries(workbook.object_after(r"^resource[ \t]+workbook[ \t]"))
    assert body["name"].startswith("guid(resourceGroup().id, applicationInsights.id, ")
    assert body["kind"] == "'shared'"
    properties = workbook.entries(workbook.object_after(r"^[ \t]*properties[ \t]*:"))
    assert properties["category"] == "'workbook'"
    assert properties["sourceId"] == "toLower(applicationInsights.id)"
    assert properties["serializedData"] == "serializedData"
    assert ("var serializedData = replace(loadTextContent('workbook.json'), '__APPLICATION_INSIGHTS_ID__', "
            "applicationInsights.id)") in text
    content = (INFRA / "app" / "workbook.json").read_text(encoding="utf-8")
    assert len(content) < 131_072, "loadTextContent reads at most 131,072 characters"
    data = json.loads(content)
    assert data["version"] == "Notebook/1.0" and data["fallbackResourceIds"] == ["__APPLICATION_INSIGHTS_ID__"]
    _, passed = bicep("main.bicep").module("workbook")
    assert passed["applicationInsightsName"] == "monitoring.outputs.name"
    main = bicep("main.bicep").text
    assert "output WORKBOOK_ID string = workbook.outputs.id" in main
    assert "output WORKBOOK_URL string = workbook.outputs.portalUrl" in main


# --- (c) alerts watch the events the app logs -------------------------------------------------

def test_alert_queries_watch_the_events_the_app_logs():
    alerts = bicep("app/alerts.bicep").text
    queries = "\n".join(re.findall(r"'''(.*?)'''", alerts, re.DOTALL))
    for event in ALERTED_EVENTS:
        assert f'customDimensions.event) == "{event}"' in queries, event
    assert 'customDimensions.outcome) in ("failed", "partial")' in queries
    for queue in POISON_QUEUES:
        assert f'"{queue}"' in queries, queue
    assert len(re.findall(r"^[ \t]*query: \w+Query$", alerts, re.MULTILINE)) == 4


# --- (d) azd finds the service and the infrastructure -----------------------------------------

def test_azure_yaml_names_the_function_service_and_points_at_infra():
    config = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert config["infra"]["path"] == "infra"
    assert (ROOT / config["infra"]["path"] / "main.bicep").exists()
    assert config["services"] == {"api": {"project": ".", "language": "python", "host": "function"}}
    api = bicep("app/api.bicep")
    assert "'azd-service-name': serviceName" in api.text
    assert api.params()["serviceName"] == "'api'"


def test_infra_sets_and_outputs_the_redirect_uri_the_pages_sign_in_with():
    from shared.web.signin import CALLBACK_PATH

    main, api = bicep("main.bicep").text, bicep("app/api.bicep")
    assert "output PAGES_REDIRECT_URI string = api.outputs.PAGES_REDIRECT_URI" in main
    assert f"var defaultRedirectUri = 'https://${{name}}.azurewebsites.net{CALLBACK_PATH}'" in api.text
    wiring = api.entries(api.object_after(r"^var[ \t]+appSettings[ \t]*="))
    expression = "empty(pagesRedirectUri) ? defaultRedirectUri : pagesRedirectUri"
    assert wiring["PAGES_REDIRECT_URI"] == expression
    assert f"output PAGES_REDIRECT_URI string = {expression}" in api.text, "the output is the setting"


def test_every_file_and_test_fidelity_names_exists():
    """`sandbox/FIDELITY.md` is read as the simulators' contract: a row that cites a moved file or
    a renamed test points the reader nowhere."""
    text = (ROOT / "sandbox" / "FIDELITY.md").read_text(encoding="utf-8")
    missing = sorted({path for path in re.findall(r"`((?:shared|sandbox|tests|bench)/[\w/]+\.py)", text)
                      if not (ROOT / path).is_file()})
    assert not missing, f"FIDELITY.md names files that do not exist: {missing}"
    for path, name in sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)", text))):
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"def {name}\w*\(", source), f"FIDELITY.md names {path}::{name}, which does not exist"
