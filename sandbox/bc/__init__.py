"""A simulated Business Central API v2.0 (customers, items, sales invoices and their lines).

It answers at ``{server}/v2.0/{tenant}/{environment}/api/v2.0/…`` exactly where the real service
answers at ``https://api.businesscentral.dynamics.com/v2.0/…``, so the app only needs
``BC_BASE_URL={server}/v2.0``. The behaviour follows the APIV2 AL pages (field names, which fields
are read-only, the validation messages) and the documented OData behaviour, including the parts
an integration tends to get wrong; `sandbox/FIDELITY.md` lists each behaviour with its source.

Modules, bottom up: `errors` (BC's error shape), `odata_syntax` (the ``$filter`` grammar), `odata` (the ``$filter``
engine), `fields`
(entity specs and value coercion), `options` (switches for what the docs leave open), `rules`
(BC's field validations and their messages), `store` (state, transactions, number series),
`masters` (customers, items), `countries` (Country/Region), `invoices` (sales invoices and
lines), `backend` (all of it together), `etags`, `wire` (request/response values), `answers`
(OData lists and paging), `api` (routing), `batch` (JSON ``$batch``), `auth` (tokens,
environments), `data_api` (what a BC user does) and `app` (`BcSimulator`, BC's limits).
"""

from sandbox.bc.app import BcSimulator
from sandbox.bc.errors import BcError
from sandbox.bc.etags import etag

__all__ = ["BcError", "BcSimulator", "etag"]
