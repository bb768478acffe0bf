"""Everything the app talks to, started together: Azurite and the Entra ID, Graph and Business
Central simulators over HTTPS with a CA made for this run. The demo, the tests and the benchmark
all use this; the app sees only settings (URLs, ids, the CA through SSL_CERT_FILE).

A person's browser does not trust the run's CA, so what a browser visits is served over plain
HTTP on loopback as well: Entra's sign-in pages (``servers["entra-browser"]``, named by the
openid-configuration's ``authorization_endpoint``) and Business Central's web client
(``servers["bc-web"]``, ``BC_WEB_CLIENT_URL``). The tenant has one user, `USER_NAME`, who holds
the app role `OPERATOR_ROLE`; the app registers its redirect URI with
``sandbox.entra.register_redirect_uri(TENANT, CLIENT_ID, uri)``.

The Function App's user-assigned managed identity (``sandbox.entra.managed_identity_client_id``,
``managed_identity_principal_id``) lives in `TENANT`. The app registration has a secret
(`CLIENT_SECRET`); `Sandbox.trust_managed_identity` adds the federated identity credential that lets
a secret-less app authenticate as `CLIENT_ID` with the identity's token instead."""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field

from sandbox.azurite import Azurite
from sandbox.bc import BcSimulator
from sandbox.entra import EntraSimulator
from sandbox.faults import FaultPlan, Knobs
from sandbox.graph import GraphSimulator
from sandbox.server import ServerThread
from sandbox.tls import TlsFiles, make_tls_files
from sandbox.tokens import APP_ROLES, entra_issuer

TENANT = "8f3c1e2a-0000-4000-8000-00000000e1d0"
TENANT_DOMAIN = "contoso.onmicrosoft.com"
"""The tenant's initial domain: AZURE_TENANT_ID may name the tenant by it (Entra answers with the GUID)."""
CLIENT_ID = "5a1b2c3d-0000-4000-8000-0000000c1e47"
CLIENT_SECRET = "sim-secret-" + "x" * 24
ENVIRONMENT = "production"
USER_NAME = "Ada Accountant"
USER_USERNAME = "ada@contoso.example"
USER_OID = "3d5c7a10-0000-4000-8000-0000000ada01"
OPERATOR_ROLE = "Invoicing.Operator"
ENTRA_RETRY_AFTER_SECONDS = 60
"""What Entra ID's 429 to a token request says (`Retry-After`)."""
FEDERATED_CREDENTIAL = "api-managed-identity"
"""The federated identity credential of `CLIENT_ID` that trusts the managed identity."""


def seed_users(entra: EntraSimulator) -> dict:
    """The tenant's operator, as a test expects to find her (again, if a test changed her roles)."""
    return entra.add_user(TENANT, name=USER_NAME, username=USER_USERNAME, oid=USER_OID,
                          app_roles={CLIENT_ID: [OPERATOR_ROLE]})


@dataclass
class Sandbox:
    tls: TlsFiles
    azurite: Azurite
    entra: EntraSimulator
    graph: GraphSimulator
    bc: BcSimulator
    servers: dict[str, ServerThread]
    company_id: str
    business_ids: list[str] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        """The app settings (and TLS trust) that point the app at this sandbox."""
        values = {
            "AzureWebJobsStorage": self.azurite.connection_string,
            "AZURE_TENANT_ID": TENANT,
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_CLIENT_SECRET": CLIENT_SECRET,
            "AZURE_AUTHORITY_HOST": self.servers["entra"].url,
            "GRAPH_BASE_URL": f"{self.servers['graph'].url}/v1.0",
            "BC_BASE_URL": f"{self.servers['bc'].url}/v2.0",
            "BC_ENVIRONMENT": ENVIRONMENT,
            "BC_COMPANY_ID": self.company_id,
            "BC_WEB_CLIENT_URL": f"{self.servers['bc-web'].url}/webclient",
            "BOOKINGS_BUSINESS_IDS": ",".join(self.business_ids),
            "SYNC_SCHEDULE": "0 */15 * * * *",
            **self.tls.trust_env(),
        }
        values.update(overrides)
        return values

    def trust_managed_identity(self) -> dict[str, str]:
        """Make the app registration trust the managed identity (a federated identity credential on
        `CLIENT_ID`: issuer ``https://login.microsoftonline.com/{TENANT}/v2.0``, subject the identity's
        principal id, audience ``api://AzureADTokenExchange``; written again if a test changed it) and
        return the settings of a secret-less app: ``AZURE_CLIENT_ID`` (the app registration),
        ``AZURE_FEDERATED_IDENTITY_CLIENT_ID`` (the user-assigned identity whose token is the
        assertion), ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER``. Merge them into `env` and leave
        out ``AZURE_CLIENT_SECRET``."""
        entra = self.entra
        if any(c["name"] == FEDERATED_CREDENTIAL for c in entra.federated_credentials(TENANT, CLIENT_ID)):
            entra.remove_federated_credential(TENANT, CLIENT_ID, FEDERATED_CREDENTIAL)
        entra.add_federated_credential(TENANT, CLIENT_ID, name=FEDERATED_CREDENTIAL,
                                       issuer=entra_issuer(TENANT), subject=entra.managed_identity_principal_id,
                                       description="The Function App's user-assigned managed identity")
        return {"AZURE_CLIENT_ID": CLIENT_ID, "AZURE_FEDERATED_IDENTITY_CLIENT_ID": entra.managed_identity_client_id,
                **entra.managed_identity_env(self.servers["entra"].url)}

    def apply_env(self, **overrides: str) -> dict[str, str]:
        """Set the settings in this process's environment; returns the previous values."""
        previous = {}
        for name, value in self.env(**overrides).items():
            previous[name] = os.environ.get(name)
            os.environ[name] = value
        return previous


class SandboxStack(ExitStack):
    """`with SandboxStack() as sandbox:` starts everything and stops it all on exit.

    Without knobs, Graph and Business Central run under their documented limits
    (`sandbox.graph.default_plan`: 4 requests at once per mailbox, the fifth refused with 429, query
    strings up to 2,048 characters; BC's own default plan); `graph_knobs`/`bc_knobs` replace them."""

    def __init__(self, graph_knobs: Knobs | None = None, bc_knobs: Knobs | None = None,
                 page_size: int = 100, batch_item_ms: float = 0.0):
        super().__init__()
        self.graph_knobs, self.bc_knobs = graph_knobs, bc_knobs
        self.page_size, self.batch_item_ms = page_size, batch_item_ms

    def __enter__(self) -> Sandbox:
        super().__enter__()
        try:
            tls = make_tls_files()
            self.callback(shutil.rmtree, tls.ca_bundle.parent, ignore_errors=True)  # last, after the servers
            azurite = self.enter_context(Azurite())
            # Entra ID throttles token requests with 429 and "a Retry-After: 60 header" (MSAL's docs).
            entra = EntraSimulator(FaultPlan(Knobs(retry_after_seconds=ENTRA_RETRY_AFTER_SECONDS)),
                                   managed_identity_roles=APP_ROLES, managed_identity_tenant=TENANT)
            # The app registration holds exactly the permissions the app needs (admin-consented), and
            # BC lists it in every environment's Microsoft Entra Applications (the simulator's default).
            entra.register_client(TENANT, CLIENT_ID, CLIENT_SECRET, roles=APP_ROLES)
            entra.add_tenant_domain(TENANT, TENANT_DOMAIN)
            # infra's postprovision hook asks for the login_hint optional claim: sign-out names the account.
            entra.set_optional_claims(TENANT, CLIENT_ID, ["login_hint"])
            seed_users(entra)
            graph_plan = FaultPlan(self.graph_knobs) if self.graph_knobs is not None else None  # None: Graph's limits
            graph = GraphSimulator(graph_plan, page_size=self.page_size)
            bc_plan = FaultPlan(self.bc_knobs) if self.bc_knobs is not None else None  # None: BC's limits
            bc = BcSimulator(bc_plan, batch_item_ms=self.batch_item_ms)
            company_id = bc.add_company(TENANT, ENVIRONMENT)
            servers = {name: self.enter_context(ServerThread(sim.app, tls, name=f"{name}-sim"))
                       for name, sim in (("entra", entra), ("graph", graph), ("bc", bc))}
            # What a browser visits, over plain HTTP on loopback (the run's CA is not trusted there).
            servers["entra-browser"] = self.enter_context(ServerThread(entra.browser_app, None, name="entra-browser"))
            servers["bc-web"] = self.enter_context(ServerThread(bc.web_app, None, name="bc-web"))
            entra.browser_base_url = servers["entra-browser"].url
            # On exit (last in, first out) every server is told to stop first, then each is joined.
            self.callback(lambda: [server.stop_soon() for server in servers.values()])
        except BaseException:
            self.close()
            raise
        return Sandbox(tls, azurite, entra, graph, bc, servers, company_id)
