"""Signing in to the operator pages and out of them (`shared.web.signin` does the protocol).

- `GET /api/pages/signin?next=…` sends the browser to Entra ID (`renew=1`: silently, to re-read the
  signed-in user's roles);
- `GET /api/pages/signin/callback` completes the sign-in, starts a server-side session and returns
  to `next`; every failure is a 401 page saying why, logged with the reason (never a token). With
  nothing to complete it is where Entra ID returns after signing out;
- `POST /api/pages/signout` deletes the session, then sends the browser on to Entra ID's
  end-session endpoint."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlencode, urlsplit

import azure.functions as func

from shared.web import sessions
from shared.web.blueprints.pages.render import N_, render
from shared.web.blueprints.pages.web import Page, current_session, error_page, html, language_of, page, redirect, site_of
from shared.runtime import runtime
from shared.settings import SettingsError
from shared.web.signin import (PAGES_PREFIX, SESSION_COOKIE, SignInFailed, SilentSignInFailed, begin, complete, cookie,
                           end_flow_cookie, end_session_url, session_cookie)
from shared.web.signing_keys import signing_keys

log = logging.getLogger(__name__)
bp = func.Blueprint()

ANONYMOUS = func.AuthLevel.ANONYMOUS

FAILURES = {
    "entra-error": N_("Microsoft Entra ID did not sign you in: %(detail)s"),
    "flow": N_("The sign-in took too long or was started in another browser; please sign in again."),
    "state": N_("This answer from Microsoft Entra ID does not belong to your sign-in; please sign in again."),
    "redeem": N_("Microsoft Entra ID refused to complete the sign-in: %(detail)s"),
    "unreachable": N_("Microsoft Entra ID could not be reached to sign you in; try again in a moment."),
    "id-token": N_("The ID token from Microsoft Entra ID was refused (%(detail)s); please sign in again."),
    "no-redirect-uri": N_("Signing in needs the setting PAGES_REDIRECT_URI (the pages' redirect URI at Entra ID)."),
}
"""Why a sign-in failed, by `SignInFailed.reason`; `detail` is shown as text."""
ID_TOKEN_REASONS = {
    "malformed": N_("not a well-formed ID token"),
    "key": N_("signed with a key Entra ID does not publish"),
    "signature": N_("its signature does not match"),
    "issuer": N_("issued by another authority or tenant"),
    "audience": N_("issued to another application"),
    "tenant": N_("issued for another tenant"),
    "expired": N_("expired"),
    "not-yet-valid": N_("not valid yet"),
    "nonce": N_("issued for another sign-in"),
    "keys-unavailable": N_("Entra ID's signing keys could not be read"),
}


def _detail(failure: SignInFailed):
    if failure.reason == "id-token" and failure.detail in ID_TOKEN_REASONS:
        return ID_TOKEN_REASONS[failure.detail]
    return failure.detail


@bp.route(route="pages/signin", methods=["GET"], auth_level=ANONYMOUS)
async def pages_signin(req: func.HttpRequest) -> func.HttpResponse:
    rt = runtime()
    try:
        store = await rt.store()
        keys = await signing_keys(store)
        site = site_of(req, rt.settings)
        if site.redirect_uri is None:
            raise SignInFailed("no-redirect-uri")
        renewing = await current_session(req, store, keys, site, time.time()) if req.params.get("renew") else None
        location, flow_cookie = await begin(rt.settings, keys, site.redirect_uri, req.params.get("next"), site.secure,
                                            silent=renewing.principal if renewing else None,
                                            renews=renewing.key if renewing else None)
    except SettingsError as error:
        return error_page(req, 503, N_("Signing in is not possible"), str(error), rt)
    except SignInFailed as failure:
        log.warning("sign-in could not start: %s", failure.reason,
                    extra={"event": "pages_signin_failed", "reason": failure.reason, "detail": failure.detail})
        return error_page(req, 503, N_("Signing in is not possible"),
                          FAILURES[failure.reason].with_values(detail=_detail(failure)), rt)
    return redirect(location, status=302, site=site, cookies=[flow_cookie])


@bp.route(route="pages/signin/callback", methods=["GET"], auth_level=ANONYMOUS)
async def pages_signin_callback(req: func.HttpRequest) -> func.HttpResponse:
    rt = runtime()
    params = dict(req.params)
    try:
        store = await rt.store()
        keys = await signing_keys(store)
        site = site_of(req, rt.settings)
        if not params.get("code") and not params.get("error"):
            # Nothing to complete: Entra ID's end-session endpoint returning after a sign-out.
            return _signed_out(req, site, rt.settings.time_zone, end_session=None)
        completed = await complete(rt.settings, keys, req.headers.get("cookie"), params, site.secure)
    except SettingsError as error:
        return error_page(req, 503, N_("Signing in is not possible"), str(error), rt)
    except SilentSignInFailed as silent:
        # Entra ID wants the person (signed out there, or the account changed): sign in as usual.
        return redirect(f"{PAGES_PREFIX}/signin?{urlencode({'next': silent.next_path})}", status=302, site=site,
                        cookies=[end_flow_cookie(site.secure)])
    except SignInFailed as failure:
        log.warning("sign-in failed: %s", failure.reason,
                    extra={"event": "pages_signin_failed", "reason": failure.reason, "detail": failure.detail})
        return error_page(req, 401, N_("You are not signed in"),
                          FAILURES[failure.reason].with_values(detail=_detail(failure)), rt, sign_in=True,
                          cookies=[end_flow_cookie(site.secure)])
    now = time.time()
    if completed.renews:
        token, session = await sessions.renew(store, completed.renews, completed.principal, now)
    else:
        token, session = await sessions.start(store, completed.principal, now)
    log.info("operator signed in", extra={"event": "pages_signed_in", "user_oid": session.principal.oid,
                                          "renewed": bool(completed.renews)})
    return redirect(completed.next_path, site=site,
                    cookies=[session_cookie(token, keys, site.secure), end_flow_cookie(site.secure)])


@bp.route(route="pages/signout", methods=["POST"], auth_level=ANONYMOUS)
@page(authorised=False)
async def pages_signout(current: Page) -> func.HttpResponse:
    await sessions.end(await current.rt.store(), current.session.key)
    log.info("operator signed out", extra={"event": "pages_signed_out", "user_oid": current.principal.oid})
    ending = await end_session_url(current.settings, current.site.redirect_uri, current.principal.login_hint) \
        if current.site.redirect_uri else None
    return _signed_out(current.req, current.site, current.settings.time_zone, ending,
                       cookies=[*current.cookies, cookie(SESSION_COOKIE, "", 0, current.site.secure)])


def _signed_out(req: func.HttpRequest, site, time_zone: str, end_session: str | None,
                cookies: list[str] | None = None) -> func.HttpResponse:
    """"You are signed out", with the way on to Entra ID's end-session endpoint when there is one
    (the page's script follows it; a form may not redirect to another site under this CSP)."""
    language, _ = language_of(req, site)
    return html(render("signed_out.html", language, time_zone, user=None, csrf="", path=urlsplit(req.url).path,
                       nav=None, status=200, keep={}, end_session=end_session), site=site, cookies=cookies)
