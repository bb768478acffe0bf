"""People at the operator pages, as far as the app can tell, for the in-process page tests.

- `Browser(world, roles=…)`: someone with a live server-side session the app started (through the
  same domain functions the sign-in callback uses), and its signed cookie;
- `EntraBrowser(world)`: someone who signs in for real, through the simulated Entra ID's pages
  (httpx, with the simulator's cookies) and the app's sign-in routes (in process, with the app's
  cookies), as a browser would."""

from __future__ import annotations

import ssl
import time
import uuid
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from sandbox.stack import CLIENT_ID, OPERATOR_ROLE, TENANT, USER_NAME
from shared.web import sessions
from shared.web.sessions import Principal
from shared.web.signin import csrf_token, session_cookie
from shared.web.signing_keys import signing_keys

LOCAL = "http://localhost:7071"


def keys_of(world):
    async def read():
        from shared.runtime import runtime

        return await signing_keys(await runtime().store())

    return world.host.run(read(), 30)


class CookieJar:
    """The cookies the app set, as a browser keeps them (a `Max-Age=0` one is deleted)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.set_cookies: list[str] = []

    def take(self, response) -> None:
        for header in response.headers.get_all("Set-Cookie") if hasattr(response.headers, "get_all") else []:
            self.set_cookies.append(header)
            jar = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0":
                    self.values.pop(name, None)
                else:
                    self.values[name] = morsel.value

    def header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.values.items())


class Browser:
    """A signed-in person with a session the app keeps (roles as given), on `base_url`."""

    def __init__(self, world, tid: str = TENANT, roles: tuple[str, ...] = (OPERATOR_ROLE,), guest: bool = False,
                 base_url: str = LOCAL, oid: str | None = None):
        self.world, self.base_url = world, base_url
        self.principal = Principal(oid=oid or str(uuid.uuid4()), tid=tid, name="Ada Accountant",
                                   username="ada@contoso.example", roles=roles, guest=guest)
        self.keys = keys_of(world)
        self.secure = urlsplit(base_url).hostname not in ("localhost", "127.0.0.1")

        async def start():
            from shared.runtime import runtime

            return await sessions.start(await runtime().store(), self.principal, time.time())

        self.token, self.session = world.host.run(start(), 30)
        self.cookie = session_cookie(self.token, self.keys, self.secure).split(";")[0]

    @property
    def csrf(self) -> str:
        return csrf_token(self.session.key, self.keys)

    def get(self, path: str, params: dict | None = None, headers: dict | None = None):
        return self.world.host.http("GET", path, params=params, key=False, base_url=self.base_url,
                                    headers={"cookie": self.cookie, **(headers or {})})

    def post(self, path: str, form: dict | list, csrf: bool = True, headers: dict | None = None):
        fields = list(form.items()) if isinstance(form, dict) else list(form)
        if csrf:
            fields.append(("csrf", self.csrf))
        return self.world.host.http("POST", path, body=urlencode(fields), key=False, base_url=self.base_url,
                                    headers={"cookie": self.cookie, "origin": self.base_url,
                                             "content-type": "application/x-www-form-urlencoded", **(headers or {})})


class PickerForm(HTMLParser):
    """A sign-in page as a browser sees it: the form's action, hidden fields and buttons (each with
    its accessible name, whitespace collapsed)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.hidden: dict[str, str] = {}
        self.buttons: list[dict] = []
        self._button: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.action = attributes.get("action")
        elif tag == "input" and attributes.get("type") == "hidden":
            self.hidden[attributes["name"]] = attributes.get("value", "")
        elif tag == "button":
            self._button = {"name": attributes.get("name"), "value": attributes.get("value"), "label": ""}

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button["label"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None:
            self._button["label"] = " ".join(self._button["label"].split())
            self.buttons.append(self._button)
            self._button = None


class EntraBrowser:
    """Signs in through the simulated Entra ID and the app's routes; keeps both sides' cookies."""

    def __init__(self, world, base_url: str = LOCAL):
        self.world, self.base_url = world, base_url
        self.app = CookieJar()
        context = ssl.create_default_context(cafile=str(world.sandbox.tls.ca_bundle))
        self.entra = httpx.Client(verify=context, timeout=30)
        world.sandbox.entra.register_redirect_uri(TENANT, CLIENT_ID, f"{base_url}/api/pages/signin/callback")

    def close(self) -> None:
        self.entra.close()

    def app_request(self, method: str, path_and_query: str, form: dict | None = None, headers: dict | None = None):
        parts = urlsplit(path_and_query)
        path = parts.path.removeprefix("/api/")
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        all_headers = {"cookie": self.app.header(), **(headers or {})}
        body = None
        if form is not None:
            body = urlencode(form)
            all_headers |= {"content-type": "application/x-www-form-urlencoded", "origin": self.base_url}
        response = self.world.host.http(method, path, body=body, params=params, key=False, base_url=self.base_url,
                                        headers=all_headers)
        self.app.take(response)
        return response

    def get(self, path_and_query: str):
        return self.app_request("GET", path_and_query)

    def follow(self, response, account: str | None = USER_NAME, limit: int = 10):
        """Follow redirects like a browser, between the app and the simulator; at Entra's account
        picker press `account`'s button. Returns the last answer (the app's or the simulator's)."""
        for _ in range(limit):
            status = getattr(response, "status_code", None)
            if status in (301, 302, 303):
                location = response.headers["location"]
                if location.startswith("/") or location.startswith(self.base_url):
                    response = self.get(location.removeprefix(self.base_url))
                else:
                    response = self.entra.get(location)
                continue
            if hasattr(response, "text") and "Pick an account" in response.text and account is not None \
                    and response.status_code == 200:
                form = PickerForm()
                form.feed(response.text)
                button = next(b for b in form.buttons if account in b["label"])
                where = urlsplit(str(response.url))
                origin = f"{where.scheme}://{where.netloc}"
                response = self.entra.post(origin + form.action, data={**form.hidden, button["name"]: button["value"]})
                continue
            return response
        raise AssertionError("too many redirects")

    def sign_in(self, path: str = "/api/pages/bookings", account: str = USER_NAME):
        """Open a page, sign in at Entra ID as `account`, and return the page's answer."""
        return self.follow(self.get(path), account)

    def csrf_of(self, html: str) -> str:
        form = PickerForm()
        form.feed(html)
        return form.hidden.get("csrf", "")
