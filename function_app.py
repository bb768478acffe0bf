"""bookings-invoicing: Microsoft Bookings appointments → Business Central draft sales invoices.

Thin on purpose: the app and one blueprint per area. The work lives in `shared/`."""

import azure.functions as func

from shared.web.blueprints import directory, invoicing, pages, status, sync
from shared.web.blueprints.pages import account
from shared.telemetry import configure_logging

configure_logging()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

app.register_functions(sync.bp)
app.register_functions(directory.bp)
app.register_functions(invoicing.bp)
app.register_functions(status.bp)
app.register_functions(pages.bp)
app.register_functions(account.bp)
