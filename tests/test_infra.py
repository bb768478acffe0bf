"""Config drift between the app, its local settings, its Azure infrastructure and its docs.

Pure file parsing (no Bicep CLI, no Azure). The list of settings lives in four places (the
pydantic model, local.settings.sample.json, infra/app/api.bicep, the README table) and these
tests keep them one set; they also check that the Bicep modules are wired to each other and pin
the security and alerting properties that the README's Deploy and Operate sections promise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings, setting_names

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BICEP_FILES = ["main.bicep", "app/api.bicep", "app/rbac.bicep", "app/alerts.bicep",
               "app/secret.bicep"]

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
    "AZURE_CLIENT_ID": "entraClientId",        # empty → the managed identity's client id
    "AZURE_CLIENT_SECRET": "entraClientSecret",  # → Key Vault secret → Key Vault reference
}
# Simulator URLs locally; in Azure the real endpoints, i.e. the app's own defaults.
REAL_ENDPOINTS = {"AZURE_AUTHORITY_HOST", "GRAPH_BASE_URL", "BC_BASE_URL"}
# Identify things in your tenant, so no sample value is right: the deployment's tenant, no app
# registration (the managed identity is the client), or no default at all (azd asks).
TENANT_SPECIFIC = {"AZURE_TENANT_ID": "tenant().tenantId", "AZURE_CLIENT_ID": "''",
                   "BC_COMPANY_ID": None, "BOOKINGS_BUSINESS_IDS": None}

ALERTED_EVENTS = {"sync_run_finished", "message_poisoned", "invoice_job_part_failed"}
POISON_QUEUES = {"directory-upserts-poison", "invoice-jobs-poison", "sync-requests-poison"}


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


def setting_parameters() -> dict[str, str]:
    """Setting → the main.bicep parameter it comes from (for those that come from one)."""
    api, main = bicep("app/api.bicep"), bicep("main.bicep")
    wiring = api.entries(api.object_after(r"^var[ \t]+appSettings[ \t]*="))
    _, passed = main.module("api")
    mapping = {name: param for name, param in DERIVED_IN_AZURE.items() if param}
    for name, api_param in wiring.items():
        if name in DERIVED_IN_AZURE:
            continue
        assert api_param in api.params(), f"{name} is set from {api_param}, not from a parameter"
        assert passed.get(api_param) in main.params(), f"{name}: main.bicep passes no parameter"
        mapping[name] = passed[api_param]
    return mapping


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
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    for name, param in setting_parameters().items():
        expected = re.sub(r"^AZURE_", "ENTRA_", name)
        assert parameters["parameters"][param]["value"] == f"${{{expected}}}", name


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
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    declared, given = bicep("main.bicep").params(), set(parameters["parameters"])
    assert given <= set(declared), f"not in main.bicep: {given - set(declared)}"
    required = {name for name, default in declared.items() if default is None}
    assert required <= given, f"azd cannot map {required - given}"
    for name, entry in parameters["parameters"].items():
        # Unset variables fall back to main.bicep's default: the defaults live in one place.
        assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*\}", entry["value"]), name


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
    assert "roles.storageBlobDataReader" in operator and "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1" in rbac, \
        "the operator can read the last sync run and the leases"
    assert "storageBlobDataOwner" not in operator
    _, vault = bicep("main.bicep").module("keyVault")
    assert vault["enableRbacAuthorization"] == "true"
    _, insights = bicep("main.bicep").module("monitoring")
    assert insights["disableLocalAuth"] == "true"


def test_credentials_are_a_key_vault_reference_or_the_managed_identity():
    api, main = bicep("app/api.bicep"), bicep("main.bicep")
    assert ("var clientSecretSettings = empty(clientSecretUri) ? {} : {\n"
            "  AZURE_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${clientSecretUri}/)'\n"
            "}") in api.text
    assert "AZURE_CLIENT_ID: empty(entraClientId) ? identityClientId : entraClientId" in api.text
    assert "keyVaultAccessIdentityResourceId: identityId" in api.text
    assert re.search(r"@secure\(\)\s+(?:@\w+\([^\n]*\)\s+)*param entraClientSecret string = ''",
                     main.masked)
    assert sample_values()["AZURE_CLIENT_SECRET"] == ""


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


def test_infra_outputs_the_redirect_uri_the_pages_sign_in_with():
    from shared.signin import CALLBACK_PATH

    bicep = (INFRA / "main.bicep").read_text()
    assert f"output PAGES_REDIRECT_URI string = '${{api.outputs.SERVICE_API_URI}}{CALLBACK_PATH}'" in bicep
