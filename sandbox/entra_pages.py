"""The pages the simulated Entra ID shows a browser: "Pick an account", errors, "Continue to the
application" (form post) and "You signed out". No script; the one stylesheet is allowed by hash
in a strict CSP, and every value is HTML-escaped."""

from __future__ import annotations

import base64
import hashlib
import html
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from starlette.responses import HTMLResponse, RedirectResponse, Response

_CHOICE_FIELDS = ("account", "action")


_STYLE = ("body{font-family:'Segoe UI',system-ui,sans-serif;margin:0;background:#f2f2f2;color:#1b1b1b}"
          "main{max-width:28rem;margin:3rem auto;background:#fff;padding:2rem 2.5rem;"
          "box-shadow:0 2px 6px rgba(0,0,0,.2)}h1{font-size:1.5rem;font-weight:600}"
          "ul{list-style:none;padding:0}button{display:block;width:100%;text-align:left;padding:.75rem;"
          "margin:.25rem 0;border:1px solid #8a8886;background:#fff;font:inherit;cursor:pointer}"
          "button:hover,button:focus{background:#e6e6e6;outline:2px solid #0067b8}"
          ".username{display:block;color:#605e5c}.secondary{width:auto}.error{color:#a80000}")
_CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        + "'; base-uri 'none'; frame-ancestors 'none'")
_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Cache-Control": "no-store", "Pragma": "no-cache"}


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n"
                f"{body}\n</main>\n</body>\n</html>\n")
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


def error_page(code: int, message: str, status: int = 400) -> HTMLResponse:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = ("<h1>Sign in</h1>\n<p>Sorry, but we’re having trouble signing you in.</p>\n"
            f"<p class=\"error\" role=\"alert\">AADSTS{code}: {escape(message)}</p>\n"
            f"<dl>\n<dt>Request Id</dt><dd>{uuid.uuid4()}</dd>\n<dt>Correlation Id</dt><dd>{uuid.uuid4()}</dd>\n"
            f"<dt>Timestamp</dt><dd>{now}</dd>\n</dl>")
    return page("Sign in to your account", body, status)


def hidden_fields(values: Mapping[str, str]) -> str:
    return "\n".join(f"<input type=\"hidden\" name=\"{escape(name)}\" value=\"{escape(value)}\">"
                     for name, value in values.items())


def picker(tenant: str, params: Mapping[str, str], users: list, problem: str | None = None,
            status: int = 200) -> HTMLResponse:
    action = f"/{quote(tenant, safe='')}/oauth2/v2.0/authorize"
    request = {name: value for name, value in params.items() if name not in _CHOICE_FIELDS}
    alert = f"<p class=\"error\" role=\"alert\">{escape(problem)}</p>\n" if problem else ""
    if users:
        accounts = "\n".join(
            f"<li><button type=\"submit\" name=\"account\" value=\"{escape(user.oid)}\">"
            f"<span class=\"name\">{escape(user.name)}</span> "
            f"<span class=\"username\">{escape(user.username)}</span></button></li>" for user in users)
        choice = f"<ul aria-label=\"Accounts\">\n{accounts}\n</ul>\n"
    else:
        choice = f"<p>There are no user accounts in the directory {escape(tenant)}.</p>\n"
    body = (f"<h1 id=\"heading\">Pick an account</h1>\n{alert}"
            f"<p>to continue to the application {escape(params.get('client_id', ''))}</p>\n"
            f"<form method=\"post\" action=\"{escape(action)}\" aria-labelledby=\"heading\">\n"
            f"{hidden_fields(request)}\n{choice}"
            "<button type=\"submit\" name=\"action\" value=\"cancel\" class=\"secondary\">Cancel</button>\n</form>")
    return page("Sign in to your account", body, status)


def answer(redirect_uri: str, mode: str, values: Mapping[str, str]) -> Response:
    """Send the authorization response to the app as ``response_mode`` asks."""
    if mode == "form_post":  # Entra posts with a script; without one, the user continues
        body = ("<h1>Continue to the application</h1>\n"
                f"<form method=\"post\" action=\"{escape(redirect_uri)}\">\n{hidden_fields(values)}\n"
                "<p>Script is disabled. Select Continue to go on.</p>\n"
                "<button type=\"submit\" class=\"secondary\">Continue</button>\n</form>")
        return page("Working...", body)
    encoded = urlencode(values)
    if mode == "fragment":
        location = f"{redirect_uri}#{encoded}"
    else:
        location = f"{redirect_uri}{'&' if urlsplit(redirect_uri).query else '?'}{encoded}"
    return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store"})


def logged_out_page() -> HTMLResponse:
    return page("Sign out", "<h1>You signed out of your account</h1>\n"
                             "<p>It’s a good idea to close all browser windows.</p>")


def form_of(body: bytes) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(body.decode(), keep_blank_values=True).items()}
