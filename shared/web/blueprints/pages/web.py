"""What every operator page shares: who is asking, in which language, is the form genuine, and
the headers that keep the browser strict.

`page(handler)` wraps a handler the way `shared.web.api.endpoint` wraps the JSON API's: it refuses a
request without a live server-side session (a GET is sent to sign in, anything else gets 401),
renews roles older than the hour by a silent sign-in, refuses a user of another tenant, a guest or
someone without the app role (403, logged), refuses a POST without the session's CSRF token or
from another origin (403, logged), picks the language, and answers with a Content-Security-Policy
that allows no inline script. Handlers only parse, call the domain, and render."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

import azure.functions as func

from shared.web import sessions
from shared.web.blueprints.pages.render import LANGUAGES, Message, N_, choose_language, render
from shared.runtime import Runtime, runtime
from shared.web.sessions import Session
from shared.settings import LOOPBACK_HOSTS, Settings, SettingsError
from shared.web.signin import (CALLBACK_PATH, PAGES_PREFIX, NotAllowed, authorise, cookie, csrf_ok, csrf_token,
                           read_cookie, session_token)
from shared.web.signing_keys import SigningKeys, signing_keys

log = logging.getLogger(__name__)

LANGUAGE_COOKIE = "bi_lang"
MAX_FORM_BYTES = 1_000_000
HSTS = "max-age=31536000; includeSubDomains"

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

REFUSALS = {
    "tenant": N_("Your account belongs to another organisation than this app's."),
    "guest": N_("Guest accounts cannot use these pages. An administrator can allow them with the setting "
                "PAGES_ALLOW_GUESTS."),
    "role": N_("Your account does not hold the app role %(role)s. An administrator can assign it in the Entra "
               "admin center: Enterprise applications → this app → Users and groups."),
}


@dataclass(frozen=True)
class Site:
    """Where the pages live, from `PAGES_REDIRECT_URI` (or, unset, a loopback request's own URL)."""
    origin: str
    secure: bool
    """Cookies `Secure` with the `__Host-` prefix, and HSTS: everywhere but on loopback."""
    redirect_uri: str | None
    """The sign-in redirect URI; None when neither the setting nor a loopback request gives one."""


def site_of(req: func.HttpRequest, settings: Settings | None) -> Site:
    configured = settings.pages_redirect_uri if settings else None
    parts = urlsplit(configured or req.url)
    origin = f"{parts.scheme}://{parts.netloc}"
    loopback = parts.hostname in LOOPBACK_HOSTS
    redirect = configured or (f"{origin}{CALLBACK_PATH}" if loopback else None)
    return Site(origin, not loopback, redirect)


def headers_for(site: Site | None) -> dict[str, str]:
    return {**SECURITY_HEADERS, **({"Strict-Transport-Security": HSTS} if site and site.secure else {})}


def _with_cookies(response: func.HttpResponse, cookies: list[str]) -> func.HttpResponse:
    for value in cookies:
        response.headers.add("Set-Cookie", value)
    return response


def html(body: str, status: int = 200, site: Site | None = None, cookies: list[str] | None = None
         ) -> func.HttpResponse:
    return _with_cookies(func.HttpResponse(body, status_code=status, mimetype="text/html", charset="utf-8",
                                           headers=headers_for(site)), cookies or [])


def redirect(location: str, status: int = 303, site: Site | None = None, cookies: list[str] | None = None
             ) -> func.HttpResponse:
    return _with_cookies(func.HttpResponse(status_code=status, headers={**headers_for(site), "Location": location}),
                         cookies or [])


def language_of(req: func.HttpRequest, site: Site) -> tuple[str, str | None]:
    """(language, Set-Cookie remembering an explicit choice or None)."""
    requested = req.params.get("lang")
    remembered = read_cookie(req.headers.get("cookie"), LANGUAGE_COOKIE, site.secure)
    language = choose_language(requested, remembered, req.headers.get("accept-language"))
    if requested in LANGUAGES and requested != remembered:
        return language, cookie(LANGUAGE_COOKIE, requested, 365 * 86400, site.secure)
    return language, None


def time_zone(rt: Runtime | None) -> str:
    return rt.settings.time_zone if rt else "UTC"


def error_page(req: func.HttpRequest, status: int, title: Message, detail: Message | str, rt: Runtime | None = None,
               sign_in: bool = False, cookies: list[str] | None = None) -> func.HttpResponse:
    """A page saying what went wrong: `title` a message of the catalog, `detail` one too or runtime
    text (shown as text, never as markup)."""
    site = site_of(req, rt.settings if rt else None)
    language, _ = language_of(req, site)
    return html(render("error.html", language, time_zone(rt), title=title, detail=detail, sign_in=sign_in,
                       user=None, csrf="", path=urlsplit(req.url).path, nav=None, status=status, keep={}), status,
                site, cookies)


@dataclass
class Page:
    """One signed-in request to a page."""
    req: func.HttpRequest
    rt: Runtime
    keys: SigningKeys
    session: Session
    site: Site
    language: str
    form: dict[str, list[str]] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)

    @property
    def settings(self):
        return self.rt.settings

    @property
    def principal(self):
        return self.session.principal

    @property
    def csrf(self) -> str:
        return csrf_token(self.session.key, self.keys)

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
        return html(body, status, self.site, self.cookies)

    def redirect(self, location: str) -> func.HttpResponse:
        return redirect(location, site=self.site, cookies=self.cookies)


def _same_origin(req: func.HttpRequest, site: Site) -> bool:
    """A browser names the page a form came from; it must be this app (no cross-site posts)."""
    origin = req.headers.get("origin")
    if origin and origin != "null":
        return origin.rstrip("/") == site.origin
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


def _here(req: func.HttpRequest) -> str:
    parts = urlsplit(req.url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _navigation(req: func.HttpRequest) -> bool:
    """A GET the browser shows as a page (not the job page's progress fetch)."""
    return req.method == "GET" and req.params.get("fragment") != "1"


async def current_session(req: func.HttpRequest, store, keys: SigningKeys, site: Site, now: float
                          ) -> Session | None:
    token = session_token(req.headers.get("cookie"), keys, site.secure)
    session, _ = await sessions.find(store, token, now) if token else (None, "none")
    return session


def page(handler: Callable[[Page], Awaitable[func.HttpResponse]] | None = None, *, authorised: bool = True):
    """`authorised=False`: any live session will do (signing out must work for someone refused)."""
    if handler is None:
        return lambda inner: page(inner, authorised=authorised)

    async def entry(req: func.HttpRequest) -> func.HttpResponse:
        try:
            rt = runtime()
            store = await rt.store()
            keys = await signing_keys(store)
        except SettingsError as error:
            return error_page(req, 503, N_("The app is not configured"), str(error))
        site = site_of(req, rt.settings)
        now = time.time()
        session = await current_session(req, store, keys, site, now)
        if session is None:
            if _navigation(req):
                return redirect(f"{PAGES_PREFIX}/signin?{urlencode({'next': _here(req)})}", status=302, site=site)
            return error_page(req, 401, N_("Please sign in"), N_("This page is for signed-in users of the organisation."),
                              rt, sign_in=True)
        age = session.roles_age(now)
        if authorised and (age >= sessions.ROLES_SECONDS or (_navigation(req) and age >= sessions.RENEW_SECONDS)):
            # Roles are re-read from Entra ID by a silent sign-in before they are an hour old.
            if _navigation(req):
                return redirect(f"{PAGES_PREFIX}/signin?{urlencode({'next': _here(req), 'renew': '1'})}", status=302,
                                site=site)
            return error_page(req, 401, N_("Please sign in"), N_("Your sign-in must be renewed: reload the page."),
                              rt, sign_in=True)
        language, language_cookie = language_of(req, site)
        current = Page(req, rt, keys, session, site, language, cookies=[language_cookie] if language_cookie else [])
        if authorised:
            try:
                authorise(session.principal, rt.settings)
            except NotAllowed as refusal:
                log.warning("page refused (403): %s", refusal.reason,
                            extra={"event": "pages_forbidden", "reason": refusal.reason,
                                   "user_oid": session.principal.oid, "path": urlsplit(req.url).path})
                return current.render("error.html", 403, title=N_("Not allowed"),
                                      detail=REFUSALS[refusal.reason].with_values(role=refusal.role or ""),
                                      sign_in=False)
        if req.method == "POST":
            form = _parse_form(req)
            if form is None:
                return error_page(req, 400, N_("Not a form"), N_("This address takes the forms of these pages only."), rt)
            if not _same_origin(req, site) or not csrf_ok(session.key, keys, (form.get("csrf") or [None])[0]):
                log.warning("page form refused (403): no valid CSRF token or another origin",
                            extra={"event": "pages_csrf_refused", "reason": "csrf", "user_oid": session.principal.oid,
                                   "path": urlsplit(req.url).path})
                return error_page(req, 403, N_("The form has expired"),
                                  N_("This form was not sent from this page in your session. Reload the page and "
                                     "try again."), rt)
            current.form = form
        return await handler(current)

    # The function's name and docs, but not its signature: the worker binds `req` by parameter name.
    entry.__name__, entry.__qualname__, entry.__doc__ = handler.__name__, handler.__qualname__, handler.__doc__
    return entry
