"""What every operator page shares: who is asking, in which language, is the form genuine, and
the headers that keep the browser strict.

`page(handler)` wraps a handler the way `shared.api.endpoint` wraps the JSON API's: it refuses a
request without a verified user (a GET is sent to sign in, anything else gets 401), refuses a user
of another tenant or without `PAGES_ALLOWED_ROLE` (403), refuses a POST without the session's
CSRF token or from another origin (403), picks the language, and answers with a
Content-Security-Policy that allows no inline script. Handlers only parse, call the domain, and
render."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

import azure.functions as func

from shared.blueprints.pages.render import LANGUAGES, N_, choose_language, render
from shared.runtime import Runtime, runtime
from shared.settings import SettingsError
from shared.signin import (PAGES_PREFIX, NotAllowed, Principal, authorise, cookie, csrf_ok, csrf_token,
                           principal_of, read_cookie, signing_key)

log = logging.getLogger(__name__)

LANGUAGE_COOKIE = "bi_lang"
MAX_FORM_BYTES = 1_000_000

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def secure_request(req: func.HttpRequest) -> bool:
    return urlsplit(req.url).scheme == "https"


def base_url(req: func.HttpRequest) -> str:
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}"


def html(body: str, status: int = 200, headers: dict | None = None) -> func.HttpResponse:
    return func.HttpResponse(body, status_code=status, mimetype="text/html", charset="utf-8",
                             headers={**SECURITY_HEADERS, **(headers or {})})


def redirect(location: str, status: int = 303, headers: dict | None = None) -> func.HttpResponse:
    return func.HttpResponse(status_code=status, headers={**SECURITY_HEADERS, "Location": location, **(headers or {})})


def language_of(req: func.HttpRequest) -> tuple[str, str | None]:
    """(language, Set-Cookie remembering an explicit choice or None)."""
    requested = req.params.get("lang")
    remembered = read_cookie(req.headers.get("cookie"), LANGUAGE_COOKIE)
    language = choose_language(requested, remembered, req.headers.get("accept-language"))
    if requested in LANGUAGES and requested != remembered:
        return language, cookie(LANGUAGE_COOKIE, requested, 365 * 86400, secure_request(req))
    return language, None


def time_zone(rt: Runtime | None) -> str:
    return rt.settings.time_zone if rt else "UTC"


def error_page(req: func.HttpRequest, status: int, title: str, detail: str, rt: Runtime | None = None,
               sign_in: bool = False) -> func.HttpResponse:
    language, _ = language_of(req)
    return html(render("error.html", language, time_zone(rt), title=title, detail=detail, sign_in=sign_in,
                       user=None, csrf="", path=urlsplit(req.url).path, nav=None, status=status, keep={}), status)


@dataclass
class Page:
    """One signed-in request to a page."""
    req: func.HttpRequest
    rt: Runtime
    key: bytes
    principal: Principal
    language: str
    form: dict[str, list[str]] = field(default_factory=dict)
    set_cookie: str | None = None

    @property
    def settings(self):
        return self.rt.settings

    @property
    def csrf(self) -> str:
        return csrf_token(self.principal, self.key)

    def value(self, name: str) -> str | None:
        """A form field (POST) or query parameter (GET), first value."""
        if self.req.method == "POST" and name in self.form:
            return (self.form[name] or [None])[0]
        return self.req.params.get(name)

    def values(self, name: str) -> list[str]:
        return list(self.form.get(name, []))

    def render(self, template: str, status: int = 200, nav: str | None = None, **context) -> func.HttpResponse:
        # The language switcher keeps what the page was showing (its filters), except the language.
        keep = {k: v for k, v in self.req.params.items() if k not in ("lang", "fragment")} \
            if self.req.method == "GET" else {}
        body = render(template, self.language, self.settings.time_zone, user=self.principal, csrf=self.csrf,
                      path=urlsplit(self.req.url).path, nav=nav, status=status, keep=keep, **context)
        return html(body, status, {"Set-Cookie": self.set_cookie} if self.set_cookie else None)

    def redirect(self, location: str) -> func.HttpResponse:
        return redirect(location, headers={"Set-Cookie": self.set_cookie} if self.set_cookie else None)


def _same_origin(req: func.HttpRequest) -> bool:
    """A browser names the page a form came from; it must be this app (no cross-site posts)."""
    origin = req.headers.get("origin")
    if origin and origin != "null":
        return origin.rstrip("/") == base_url(req)
    return req.headers.get("sec-fetch-site") in (None, "same-origin")


def _parse_form(req: func.HttpRequest) -> dict[str, list[str]] | None:
    content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
    body = req.get_body() or b""
    if content_type != "application/x-www-form-urlencoded" or len(body) > MAX_FORM_BYTES:
        return None
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20_000)
    except (UnicodeDecodeError, ValueError):
        return None


def page(handler: Callable[[Page], Awaitable[func.HttpResponse]]):
    async def entry(req: func.HttpRequest) -> func.HttpResponse:
        try:
            rt = runtime()
            store = await rt.store()
            key = await signing_key(store)
        except SettingsError as error:
            return error_page(req, 503, N_("The app is not configured"), str(error))
        principal = principal_of(req.headers.get("cookie"), key)
        if principal is None:
            if req.method == "GET":
                path = urlsplit(req.url).path
                query = urlsplit(req.url).query
                target = f"{path}?{query}" if query else path
                return redirect(f"{PAGES_PREFIX}/signin?{urlencode({'next': target})}", status=302)
            return error_page(req, 401, N_("Please sign in"), N_("This page is for signed-in users of the organisation."),
                              rt, sign_in=True)
        try:
            authorise(principal, rt.settings)
        except NotAllowed as refusal:
            return error_page(req, 403, N_("Not allowed"), str(refusal), rt)
        language, set_cookie = language_of(req)
        current = Page(req, rt, key, principal, language, set_cookie=set_cookie)
        if req.method == "POST":
            form = _parse_form(req)
            if form is None:
                return error_page(req, 400, N_("Not a form"), N_("This address takes the forms of these pages only."), rt)
            if not _same_origin(req) or not csrf_ok(principal, key, (form.get("csrf") or [None])[0]):
                log.warning("page form refused: no valid CSRF token or another origin",
                            extra={"event": "pages_csrf_refused", "user_oid": principal.oid})
                return error_page(req, 403, N_("The form has expired"),
                                  N_("This form was not sent from this page in your session. Reload the page and "
                                     "try again."), rt)
            current.form = form
        return await handler(current)

    # The function's name and docs, but not its signature: the worker binds `req` by parameter name.
    entry.__name__, entry.__qualname__, entry.__doc__ = handler.__name__, handler.__qualname__, handler.__doc__
    return entry
