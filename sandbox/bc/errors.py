"""The errors the simulated Business Central API answers with, as BC shapes them.

BC reports every failure as ``{"error": {"code", "message"}}``; the code names the AL runtime
exception (``Application_DialogException`` for an AL ``Error(...)``,
``Application_FieldValidationException`` for ``TestField``…, see the docs'
`webservices/dynamics-error-codes.md`). Keeping the constructors in one place keeps the codes and
the wording identical wherever the same rule fires (a POST, a PATCH, a ``$batch`` inner request).
"""

from __future__ import annotations


class BcError(ValueError):
    """An error answer of the API: HTTP status and BC's ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def not_found(table: str, record_id: str) -> BcError:
    return BcError(404, "Internal_RecordNotFound",
                   f"The {table} does not exist. Identification fields and values: Id='{{{record_id.upper()}}}'")


def dialog(message: str) -> BcError:
    """An AL ``Error(...)`` raised by the page or table code: BC reports it as 400."""
    return BcError(400, "Application_DialogException", message)


def invalid_token() -> BcError:
    return BcError(400, "BadRequest_InvalidToken", "Could not validate the client concurrency token required by "
                                                   "the service. Please provide a valid token in the client request.")
