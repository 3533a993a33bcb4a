"""A strict, in-memory Stripe fake for tests: aiohttp on 127.0.0.1, port 0.

No public Stripe double supports Billing Meters, so the billing tests run against this one.
It is a *strict* fake: it rejects what Stripe rejects (unknown parameters, missing meters,
non-integer meter values, timestamps outside the 35-day / 5-minute window, duplicate
identifiers, concurrent calls for one customer and meter, idempotency-key misuse...) with
Stripe's error shape and status, so the official SDK raises the same exception classes it
raises against Stripe. It can also fail the way a network does (:class:`Fault`).

Point the SDK at it::

    async with run_stripe_fake() as fake:
        client = stripe.StripeClient(
            "sk_test_123",
            base_addresses={"api": fake.url, "meter_events": fake.url},
            http_client=stripe.AIOHTTPClient(session=session),
            max_network_retries=0,
        )

Where Stripe validates meter events asynchronously (unknown customer, bad value...), the fake
answers synchronously with 400 and the code of the matching asynchronous error report, so a
test sees the mistake at once. Departures from Stripe are listed in ``LIMITATIONS``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from aiohttp import web

from tests.fakes.formdecode import (
    Form,
    FormError,
    as_list,
    decode_form,
    parse_pairs,
    unknown_keys,
)

Obj = dict[str, Any]

DAY = 86_400
METER_EVENT_MAX_AGE = 35 * DAY
METER_EVENT_MAX_FUTURE = 5 * 60
ADJUSTMENT_WINDOW = DAY
DEFAULT_API_VERSION = "2026-10-28.endive"

LIMITATIONS = """\
- Meter-event validation Stripe does asynchronously (error reports) is synchronous here (400).
- Subscriptions never need a payment method: status is `trialing` with trial_period_days,
  else `active` (Stripe may answer `incomplete` for a paid price and no payment method).
- No invoices, payment methods, webhooks, v2 endpoints or `expand` (except price `tiers`).
- Cancelling a meter event takes effect at once (Stripe reports `pending` and applies later).
- Event summaries list every window in range, zeros included, oldest first.
"""


# --------------------------------------------------------------------------------------------
# Errors


class StripeError(Exception):
    """An error answered in Stripe's shape: ``{"error": {"type", "message", "code"?, "param"?}}``.

    Raised anywhere in a handler; :meth:`StripeFake._serve` turns it into the HTTP response.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> Obj:
        error: Obj = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def invalid(message: str, param: str | None = None, code: str | None = None) -> StripeError:
    return StripeError(400, message, param=param, code=code)


def missing(param: str) -> StripeError:
    return invalid(f"Missing required param: {param}.", param, "parameter_missing")


def no_such(kind: str, ident: str, param: str | None = None) -> StripeError:
    """404 when the path names a missing object, 400 when a parameter does."""
    status = 404 if param is None else 400
    return StripeError(
        status, f"No such {kind}: '{ident}'", code="resource_missing", param=param or "id"
    )


def rate_limited(message: str) -> StripeError:
    # Stripe's 429 body says invalid_request_error + code rate_limit; the SDK keys on the 429.
    return StripeError(429, message, code="rate_limit")


# --------------------------------------------------------------------------------------------
# Typed parameter access


_INT = re.compile(r"-?[0-9]+")
_URL = re.compile(r"https?://[^\s/$.?#][^\s]*")


class Params:
    """Typed access to a decoded form, naming parameters the way Stripe does in errors.

    Empty strings mean "unset" (Stripe's convention), so optional getters return None for them;
    use :meth:`given` to tell "absent" from "set to empty".
    """

    def __init__(self, data: Form, prefix: str = "") -> None:
        self._data = data
        self._prefix = prefix

    def name(self, key: str) -> str:
        return f"{self._prefix}[{key}]" if self._prefix else key

    def given(self, key: str) -> bool:
        return key in self._data

    def text(
        self,
        key: str,
        *,
        required: bool = False,
        max_length: int = 5000,
        choices: Iterable[str] | None = None,
    ) -> str | None:
        name = self.name(key)
        value = self._data.get(key)
        if value is None:
            if required:
                raise missing(name)
            return None
        if not isinstance(value, str):
            raise invalid(f"Invalid string: {name} must be a string, not a hash.", name)
        if value == "":
            if required:
                raise invalid(
                    f"You passed an empty string for '{name}'. We assume empty values are an "
                    f"attempt to unset a parameter; however '{name}' cannot be unset. You should "
                    f"remove '{name}' from your request or supply a non-empty value.",
                    name,
                    "parameter_invalid_empty",
                )
            return None
        if len(value) > max_length:
            raise invalid(
                f"Invalid {name}: must be at most {max_length} characters", name, "string_too_long"
            )
        if choices is not None:
            allowed = list(choices)
            if value not in allowed:
                raise invalid(f"Invalid {name}: must be one of {', '.join(allowed)}", name)
        return value

    def req_text(
        self, key: str, *, max_length: int = 5000, choices: Iterable[str] | None = None
    ) -> str:
        value = self.text(key, required=True, max_length=max_length, choices=choices)
        assert value is not None
        return value

    def integer(
        self,
        key: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        name = self.name(key)
        raw = self.text(key, required=required)
        if raw is None:
            return None
        if not _INT.fullmatch(raw):
            raise invalid(f"Invalid integer: {raw}", name, "parameter_invalid_integer")
        value = int(raw)
        if minimum is not None and value < minimum:
            raise invalid(f"Invalid {name}: must be greater than or equal to {minimum}", name)
        if maximum is not None and value > maximum:
            raise invalid(f"Invalid {name}: must be less than or equal to {maximum}", name)
        return value

    def req_integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.integer(key, required=True, minimum=minimum)
        assert value is not None
        return value

    def decimal(self, key: str) -> Decimal | None:
        name = self.name(key)
        raw = self.text(key)
        if raw is None:
            return None
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise invalid(f"Invalid decimal: {raw}", name) from None
        exponent = value.as_tuple().exponent
        if not value.is_finite() or value < 0 or (isinstance(exponent, int) and exponent < -12):
            raise invalid(f"Invalid decimal: {raw}", name)
        return value

    def boolean(self, key: str) -> bool | None:
        raw = self.text(key)
        if raw is None:
            return None
        if raw not in ("true", "false"):
            raise invalid(f"Invalid boolean: {raw}", self.name(key))
        return raw == "true"

    def url(self, key: str, *, required: bool = False) -> str | None:
        value = self.text(key, required=required, max_length=5000)
        if value is not None and not _URL.fullmatch(value):
            raise invalid("Not a valid URL", self.name(key), "url_invalid")
        return value

    def child(self, key: str, *, required: bool = False) -> Params | None:
        name = self.name(key)
        value = self._data.get(key)
        if value is None or value == "":
            if required:
                raise missing(name)
            return None
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {name} must be a hash.", name)
        return Params(value, name)

    def children(self, key: str, *, required: bool = False) -> list[Params]:
        name = self.name(key)
        value = self._data.get(key)
        if value is None or value == "":
            if required:
                raise missing(name)
            return []
        try:
            elements = as_list(value, name)
        except FormError as exc:
            raise invalid(exc.message, name) from None
        out = []
        for index, element in enumerate(elements):
            if not isinstance(element, dict):
                raise invalid(f"Invalid object: {name}[{index}] must be a hash.", name)
            out.append(Params(element, f"{name}[{index}]"))
        return out

    def strings(self, key: str) -> list[str]:
        name = self.name(key)
        value = self._data.get(key)
        if value is None or value == "":
            return []
        try:
            elements = as_list(value, name)
        except FormError as exc:
            raise invalid(exc.message, name) from None
        if not all(isinstance(e, str) for e in elements):
            raise invalid(f"Invalid array: {name} must be an array of strings.", name)
        return [str(e) for e in elements]

    def string_map(self, key: str, *, required: bool = False) -> dict[str, str] | None:
        """A hash of strings. ``key=""`` (clear all) comes back as ``{}``."""
        name = self.name(key)
        value = self._data.get(key)
        if value is None:
            if required:
                raise missing(name)
            return None
        if value == "":
            if required:
                raise missing(name)
            return {}
        if not isinstance(value, dict):
            raise invalid(f"Invalid object: {name} must be a hash.", name)
        for sub, sub_value in value.items():
            if not isinstance(sub_value, str):
                raise invalid(
                    f"Invalid {name}[{sub}]: values must be strings, not hashes.", f"{name}[{sub}]"
                )
        return dict(value)

    def metadata(self, key: str = "metadata") -> dict[str, str] | None:
        values = self.string_map(key)
        if values is None:
            return None
        name = self.name(key)
        if len(values) > 50:
            raise invalid(f"Invalid {name}: an object can have at most 50 metadata keys.", name)
        for sub, sub_value in values.items():
            if len(sub) > 40:
                raise invalid(
                    f"Metadata keys can have up to 40 characters, but you passed in a key that "
                    f"is {len(sub)} characters: '{sub}'",
                    f"{name}[{sub}]",
                )
            if len(sub_value) > 500:
                raise invalid(
                    f"Metadata values can have up to 500 characters, but you passed in a value "
                    f"that is {len(sub_value)} characters.",
                    f"{name}[{sub}]",
                )
        return values


def merge_metadata(current: Mapping[str, str], update: Mapping[str, str] | None) -> dict[str, str]:
    """Stripe's rules: ``metadata=""`` clears, ``metadata[k]=""`` deletes k, others set."""
    if update is None:
        return dict(current)
    if not update:
        return {}
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------
# Recorded meter events and fault injection


@dataclass
class AcceptedEvent:
    """A meter event the fake accepted (``created`` is when the fake received it)."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    meter: str = ""
    payload: dict[str, str] = field(default_factory=dict)
    created: int = 0
    cancelled: bool = False


FaultKind = Literal["status_500", "saved_500", "status_429", "timeout", "drop", "accept_then_drop"]


@dataclass
class Fault:
    """A network or server failure for requests matching ``route``.

    ``route`` is ``"METHOD /path/prefix"`` (``"*"`` or no method matches every method).
    The fault lets ``after`` matching requests through, then fires on the next ``count``
    (``None``: until :meth:`StripeFake.clear_faults`). Kinds:

    - ``status_500``: 500 ``api_error``, no ``Stripe-Should-Retry`` header; nothing processed.
    - ``saved_500``: the request passes validation, then the endpoint fails with a 500;
      nothing processed, but as on Stripe the 500 is saved under the request's idempotency key
      and replayed to every retry with that key until the key expires (~24 h,
      :meth:`StripeFake.forget_idempotency_keys`).
    - ``status_429``: 429 rate limit; nothing processed.
    - ``timeout``: hold the request ``seconds`` (or until the fake stops), then drop it.
    - ``drop``: drop the connection at once; nothing processed.
    - ``accept_then_drop``: process and record the request (idempotency result included),
      then drop the connection without answering.
    """

    route: str
    kind: FaultKind
    count: int | None = 1
    seconds: float = 0.0
    after: int = 0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        method_part, _, prefix = self.route.strip().rpartition(" ")
        method_part = method_part.strip().upper()
        if method_part not in ("", "*") and method_part != method.upper():
            return False
        return path.startswith(prefix)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count


# --------------------------------------------------------------------------------------------
# Routing


@dataclass
class Call:
    """One parsed API request, as handed to a resource handler."""

    method: str
    path: str
    args: dict[str, str]
    params: Params
    expand: list[str]


Handler = Callable[[Call], Awaitable[Obj]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    handler: Handler
    expandable: tuple[str, ...] = ()


LIST_PARAMS = ("limit", "starting_after", "ending_before")
METADATA = ("metadata", "metadata[*]")


class _EndpointFailure(StripeError):
    """A 500 from inside an endpoint, after validation: idempotency saves it."""


async def _endpoint_failure(call: Call) -> Obj:
    raise _EndpointFailure(500, "An unknown error occurred (injected fault).", type_="api_error")


@dataclass
class _IdempotencyRecord:
    fingerprint: tuple[str, str, Form]
    status: int | None = None  # None while the first request is still running
    body: bytes = b""


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _mask(key: str) -> str:
    if len(key) <= 12:
        return key[:3] + "*" * max(0, len(key) - 3)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def add_interval(ts: int, interval: str, count: int) -> int:
    """``ts`` plus ``count`` intervals, with calendar months like Stripe's billing periods."""
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + 7 * count * DAY
    months = count if interval == "month" else 12 * count
    start = datetime.fromtimestamp(ts, UTC)
    years, month0 = divmod(start.month - 1 + months, 12)
    year, month = start.year + years, month0 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


_MAX_INTERVAL_COUNT = {"day": 1095, "week": 156, "month": 36, "year": 3}


# --------------------------------------------------------------------------------------------
# The fake


class StripeFake:
    """In-memory Stripe state plus an aiohttp app that serves it.

    State is public for assertions: ``customers``, ``products``, ``prices``, ``meters``,
    ``subscriptions``, ``checkout_sessions``, ``portal_sessions`` (id -> JSON object),
    ``meter_events`` (every accepted event, cancelled ones flagged) and ``calls``
    (``(method, path)`` of every request received, dropped ones included).
    """

    def __init__(self, *, now: Callable[[], float] = time.time, api_key: str | None = None) -> None:
        self.now = now
        self.api_key = api_key
        self.meter_event_delay = 0.0
        self.customers: dict[str, Obj] = {}
        self.products: dict[str, Obj] = {}
        self.prices: dict[str, Obj] = {}
        self.meters: dict[str, Obj] = {}
        self.subscriptions: dict[str, Obj] = {}
        self.checkout_sessions: dict[str, Obj] = {}
        self.portal_sessions: dict[str, Obj] = {}
        self.meter_events: list[AcceptedEvent] = []
        self.calls: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.internal_errors: list[Exception] = []
        self._deleted_customers: set[str] = set()
        self._identifiers: set[str] = set()
        self._in_flight: set[tuple[str, str]] = set()
        self._idempotency: dict[tuple[str, str], _IdempotencyRecord] = {}
        self._checkout_lines: dict[str, list[tuple[str, int | None]]] = {}
        self._checkout_subscription_data: dict[str, tuple[dict[str, str], int | None]] = {}
        self._down = False
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()
        self.routes = self._routes()

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._url is None:
            raise RuntimeError("the Stripe fake is not running; call start() first")
        return self._url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); state survives stop/start."""
        if self._runner is not None:
            raise RuntimeError("the Stripe fake is already running")
        self._closing = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0]
        self._runner = runner
        self._url = f"http://{host}:{bound[1]}"
        return self._url

    async def stop(self) -> None:
        """Stop serving; requests held by a ``timeout`` fault are dropped at once."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._url = None

    # ---- fault injection and test helpers ----------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_down(self, down: bool) -> None:
        """While down, every request's connection is dropped before anything is processed."""
        self._down = down

    def up(self) -> None:
        """End :meth:`set_down` (``set_down(False)``)."""
        self._down = False

    @property
    def is_down(self) -> bool:
        return self._down

    def lose_event(self, identifier: str) -> AcceptedEvent:
        """Forget an accepted event as if Stripe lost it (its identifier becomes free again)."""
        for index, event in enumerate(self.meter_events):
            if event.identifier == identifier:
                del self.meter_events[index]
                self._identifiers.discard(identifier)
                return event
        raise KeyError(identifier)

    def forget_idempotency_keys(self) -> None:
        """Drop every saved idempotency result, as Stripe does after about 24 hours; meter
        event identifiers stay taken (Stripe deduplicates those separately)."""
        self._idempotency = {k: r for k, r in self._idempotency.items() if r.status is None}

    def total(self, customer: str | None = None, event_name: str | None = None) -> int:
        """Sum of the values of accepted, not cancelled events, optionally filtered."""
        return sum(
            e.value
            for e in self.meter_events
            if not e.cancelled
            and (customer is None or e.customer == customer)
            and (event_name is None or e.event_name == event_name)
        )

    def identifiers(self) -> list[str]:
        """Identifiers of accepted events in arrival order (cancelled ones included)."""
        return [e.identifier for e in self.meter_events]

    def add_customer(
        self,
        *,
        email: str | None = None,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Obj:
        """Create a customer directly (no HTTP), for test setup."""
        return self._new_customer(email=email, name=name, metadata=dict(metadata or {}))

    def add_meter(
        self,
        event_name: str,
        *,
        formula: Literal["sum", "count", "last"] = "sum",
        display_name: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
    ) -> Obj:
        """Create an active meter directly (no HTTP), for test setup."""
        if self._meter_by_event_name(event_name) is not None:
            raise ValueError(f"a meter for {event_name!r} exists already")
        return self._new_meter(
            display_name or event_name, event_name, formula, customer_key, value_key, None
        )

    def complete_checkout(self, session_id: str) -> Obj:
        """Act as the customer paying: create the customer (if needed) and the subscription,
        and mark the session complete. Returns the updated session."""
        session = self.checkout_sessions[session_id]
        if session["status"] != "open":
            raise ValueError(f"checkout session {session_id} is {session['status']}")
        if session["customer"] is None:
            customer = self._new_customer(email=session["customer_email"], name=None, metadata={})
            session["customer"] = customer["id"]
        if session["mode"] == "subscription":
            metadata, trial_days = self._checkout_subscription_data[session_id]
            lines = self._checkout_lines[session_id]
            items: list[tuple[Obj, int | None, dict[str, str]]] = [
                (self.prices[p], q, {}) for p, q in lines if self.prices[p]["recurring"]
            ]
            subscription = self._new_subscription(
                session["customer"], items, metadata, trial_days, None
            )
            session["subscription"] = subscription["id"]
        session["status"] = "complete"
        session["payment_status"] = "paid" if session["amount_total"] else "no_payment_required"
        return session

    # ---- HTTP entry point --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        self.calls.append((method, path))
        if self._down:
            return self._drop(request)
        fault = self._next_fault(method, path)
        if fault is not None:
            if fault.kind == "drop":
                return self._drop(request)
            if fault.kind == "timeout":
                await self._hold(fault.seconds)
                return self._drop(request)
            if fault.kind == "status_500":
                return self._respond(
                    request,
                    500,
                    StripeError(
                        500, "An unknown error occurred (injected fault).", type_="api_error"
                    ).body(),
                    {},
                )
            if fault.kind == "status_429":
                error = rate_limited(
                    "Request rate limit exceeded. You can learn more about rate limits here "
                    "https://stripe.com/docs/rate-limits."
                )
                return self._respond(request, 429, error.body(), {})
        fail = fault is not None and fault.kind == "saved_500"
        status, body, headers = await self._serve(request, fail_in_endpoint=fail)
        if fault is not None and fault.kind == "accept_then_drop":
            return self._drop(request)
        return self._respond(request, status, body, headers)

    def _next_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.exhausted or not fault.matches(method, path):
                continue
            fault.seen += 1
            if fault.seen > fault.after:
                fault.fired += 1
                return fault
        return None

    async def _hold(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        """Close the connection without answering; the client sees a disconnect."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp fails to write this to the aborted transport and gives up quietly.
        return web.Response(status=500)

    def _respond(
        self, request: web.Request, status: int, body: Obj | bytes, headers: Mapping[str, str]
    ) -> web.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
        out = {
            "Request-Id": _new_id("req"),
            "Stripe-Version": request.headers.get("Stripe-Version", DEFAULT_API_VERSION),
            **headers,
        }
        idempotency_key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and idempotency_key:
            out["Idempotency-Key"] = idempotency_key
        return web.Response(status=status, body=raw, content_type="application/json", headers=out)

    async def _serve(
        self, request: web.Request, *, fail_in_endpoint: bool = False
    ) -> tuple[int, Obj | bytes, dict[str, str]]:
        """Authenticate, route, decode, apply idempotency, run the handler (or, with
        `fail_in_endpoint`, fail inside it with a 500 that idempotency saves).

        Every StripeError becomes its JSON answer here, in one place."""
        try:
            api_key = self._authenticate(request)
            version = request.headers.get("Stripe-Version")
            if version is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}(\.\w+)?", version):
                raise invalid(f"Invalid Stripe API version: {version}", code="invalid_api_version")
            route, args = self._route(request.method, request.path)
            form, keys = await self._read_form(request)
            unknown = unknown_keys(keys, (*route.params, "expand[#]"))
            if unknown:
                raise invalid(
                    f"Received unknown parameter: {unknown[0]}", unknown[0], "parameter_unknown"
                )
            params = Params(form)
            expand = params.strings("expand")
            for item in expand:
                if item not in route.expandable:
                    raise invalid(
                        f"This Stripe fake cannot expand {item!r} on {request.path}.", "expand"
                    )
            call = Call(request.method, request.path, args, params, expand)
            handler = _endpoint_failure if fail_in_endpoint else route.handler
            key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
            if key is None:
                return 200, await handler(call), {}
            return await self._idempotent(api_key, key, call, form, handler)
        except StripeError as exc:
            return exc.status, exc.body(), exc.headers
        except Exception as exc:  # a bug in the fake: make it loud, not a silent 500 page
            self.internal_errors.append(exc)
            error = StripeError(500, f"Stripe fake internal error: {exc!r}", type_="api_error")
            return 500, error.body(), {}

    async def _idempotent(
        self, api_key: str, key: str, call: Call, form: Form, handler: Handler
    ) -> tuple[int, Obj | bytes, dict[str, str]]:
        if len(key) > 255:
            raise invalid("Idempotency keys can be at most 255 characters long.", code="invalid")
        fingerprint = (call.method, call.path, form)
        slot = (api_key, key)
        record = self._idempotency.get(slot)
        if record is not None:
            if record.fingerprint != fingerprint:
                raise StripeError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they "
                    f"were first used with. Try using a key other than '{key}' if you meant to "
                    "execute a different request.",
                    type_="idempotency_error",
                )
            if record.status is None:
                raise StripeError(
                    409,
                    "There is currently another in-progress request using this Idempotent Key "
                    "(that probably means you submitted twice, and the other request is still "
                    f"going through): {key}. Please try again later.",
                    type_="idempotency_error",
                )
            return record.status, record.body, {"Idempotent-Replayed": "true"}
        record = _IdempotencyRecord(fingerprint)
        self._idempotency[slot] = record
        saved = False
        try:
            result = await handler(call)
            record.status, record.body = 200, json.dumps(result, indent=2).encode()
            saved = True
        except _EndpointFailure as exc:
            # The endpoint had started: Stripe saves its 500 like any result and replays it.
            record.status, record.body = exc.status, json.dumps(exc.body(), indent=2).encode()
            saved = True
        finally:
            # Stripe saves no result for a request that failed validation: a retry re-runs it.
            if not saved:
                del self._idempotency[slot]
        return record.status, record.body, {}

    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.strip().partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credential.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credential.strip(), validate=True).decode().split(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        if not key:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                "or we can help at https://support.stripe.com/.",
            )
        if self.api_key is not None:
            ok = secrets.compare_digest(key, self.api_key)
        else:
            ok = re.fullmatch(r"(sk|rk)_test_[A-Za-z0-9_]+", key) is not None
        if not ok:
            raise StripeError(401, f"Invalid API Key provided: {_mask(key)}")
        return key

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        for route in self.routes:
            if route.method != method:
                continue
            match = route.pattern.fullmatch(path)
            if match is not None:
                return route, match.groupdict()
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    async def _read_form(self, request: web.Request) -> tuple[Form, list[str]]:
        raw_query = request.raw_path.partition("?")[2]
        try:
            pairs = parse_pairs(raw_query)
            if request.method == "POST":
                body = await request.read()
                if body:
                    content_type = request.headers.get("Content-Type", "")
                    if not content_type.startswith("application/x-www-form-urlencoded"):
                        raise invalid(
                            f"Invalid request: unsupported Content-Type {content_type or 'none'}."
                            " If error persists and you need assistance, please contact "
                            "support@stripe.com."
                        )
                    try:
                        text = body.decode("utf-8")
                    except UnicodeDecodeError:
                        raise invalid("Invalid request: the body is not UTF-8.") from None
                    pairs += parse_pairs(text)
            return decode_form(pairs), [k for k, _ in pairs]
        except FormError as exc:
            raise invalid(exc.message, exc.param) from None

    # ---- route table ---------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        def route(
            method: str,
            path: str,
            handler: Handler,
            params: Iterable[str] = (),
            expandable: Iterable[str] = (),
        ) -> Route:
            regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
            return Route(method, re.compile(regex), tuple(params), handler, tuple(expandable))

        customer_fields = ("email", "name", "description", "phone", *METADATA)
        tiers = tuple(
            f"tiers[#][{f}]"
            for f in (
                "up_to",
                "unit_amount",
                "unit_amount_decimal",
                "flat_amount",
                "flat_amount_decimal",
            )
        )
        price_create = (
            "currency",
            "product",
            "product_data[name]",
            "product_data[active]",
            "product_data[metadata][*]",
            "unit_amount",
            "unit_amount_decimal",
            "billing_scheme",
            "tiers_mode",
            *tiers,
            "recurring[interval]",
            "recurring[interval_count]",
            "recurring[usage_type]",
            "recurring[meter]",
            "transform_quantity[divide_by]",
            "transform_quantity[round]",
            "lookup_key",
            "transfer_lookup_key",
            "nickname",
            "active",
            "tax_behavior",
            *METADATA,
        )
        price_list = (
            *LIST_PARAMS,
            "active",
            "currency",
            "product",
            "type",
            "lookup_keys[#]",
            "recurring[interval]",
            "recurring[usage_type]",
            "recurring[meter]",
        )
        item = ("items[#][price]", "items[#][quantity]", "items[#][metadata][*]")
        return [
            route("POST", "/v1/customers", self._create_customer, customer_fields),
            route("GET", "/v1/customers", self._list_customers, (*LIST_PARAMS, "email")),
            route("GET", "/v1/customers/{id}", self._get_customer),
            route("POST", "/v1/customers/{id}", self._update_customer, customer_fields),
            route("DELETE", "/v1/customers/{id}", self._delete_customer),
            route(
                "POST",
                "/v1/products",
                self._create_product,
                ("name", "id", "active", "description", "unit_label", *METADATA),
            ),
            route("GET", "/v1/products", self._list_products, (*LIST_PARAMS, "active")),
            route("GET", "/v1/products/{id}", self._get_product),
            route(
                "POST",
                "/v1/products/{id}",
                self._update_product,
                ("name", "active", "description", *METADATA),
            ),
            route("POST", "/v1/prices", self._create_price, price_create, ("tiers",)),
            route("GET", "/v1/prices", self._list_prices, price_list, ("data.tiers",)),
            route("GET", "/v1/prices/{id}", self._get_price, (), ("tiers",)),
            route(
                "POST",
                "/v1/prices/{id}",
                self._update_price,
                ("active", "nickname", "lookup_key", "transfer_lookup_key", *METADATA),
                ("tiers",),
            ),
            route(
                "POST",
                "/v1/billing/meters",
                self._create_meter,
                (
                    "display_name",
                    "event_name",
                    "default_aggregation[formula]",
                    "customer_mapping[type]",
                    "customer_mapping[event_payload_key]",
                    "value_settings[event_payload_key]",
                    "event_time_window",
                ),
            ),
            route("GET", "/v1/billing/meters", self._list_meters, (*LIST_PARAMS, "status")),
            route("GET", "/v1/billing/meters/{id}", self._get_meter),
            route("POST", "/v1/billing/meters/{id}", self._update_meter, ("display_name",)),
            route("POST", "/v1/billing/meters/{id}/deactivate", self._deactivate_meter),
            route("POST", "/v1/billing/meters/{id}/reactivate", self._reactivate_meter),
            route(
                "GET",
                "/v1/billing/meters/{id}/event_summaries",
                self._event_summaries,
                (*LIST_PARAMS, "customer", "start_time", "end_time", "value_grouping_window"),
            ),
            route(
                "POST",
                "/v1/billing/meter_events",
                self._create_meter_event,
                ("event_name", "payload[*]", "identifier", "timestamp"),
            ),
            route(
                "POST",
                "/v1/billing/meter_event_adjustments",
                self._create_adjustment,
                ("event_name", "type", "cancel[identifier]"),
            ),
            route(
                "POST",
                "/v1/subscriptions",
                self._create_subscription,
                (
                    "customer",
                    *item,
                    "trial_period_days",
                    "cancel_at_period_end",
                    "description",
                    *METADATA,
                ),
            ),
            route(
                "GET",
                "/v1/subscriptions",
                self._list_subscriptions,
                (*LIST_PARAMS, "customer", "status", "price"),
            ),
            route("GET", "/v1/subscriptions/{id}", self._get_subscription),
            route(
                "POST",
                "/v1/subscriptions/{id}",
                self._update_subscription,
                (
                    *item,
                    "items[#][id]",
                    "items[#][deleted]",
                    "cancel_at_period_end",
                    "proration_behavior",
                    "description",
                    *METADATA,
                ),
            ),
            route(
                "DELETE",
                "/v1/subscriptions/{id}",
                self._cancel_subscription,
                ("invoice_now", "prorate"),
            ),
            route(
                "POST",
                "/v1/billing_portal/sessions",
                self._create_portal_session,
                ("customer", "return_url"),
            ),
            route(
                "POST",
                "/v1/checkout/sessions",
                self._create_checkout_session,
                (
                    "mode",
                    "line_items[#][price]",
                    "line_items[#][quantity]",
                    "success_url",
                    "cancel_url",
                    "customer",
                    "customer_email",
                    "client_reference_id",
                    "allow_promotion_codes",
                    "subscription_data[metadata][*]",
                    "subscription_data[trial_period_days]",
                    *METADATA,
                ),
            ),
            route("GET", "/v1/checkout/sessions/{id}", self._get_checkout_session),
        ]

    # ---- shared helpers ------------------------------------------------------------------------

    def _ts(self) -> int:
        return int(self.now())

    def _page(self, call: Call, items: list[Obj], url: str, kind: str) -> Obj:
        params = call.params
        limit = params.integer("limit", minimum=1, maximum=100) or 10
        after = params.text("starting_after")
        before = params.text("ending_before")
        if after is not None and before is not None:
            raise invalid(
                "You may only specify one of these parameters: ending_before, starting_after."
            )
        ids = [item["id"] for item in items]
        if after is not None:
            if after not in ids:
                raise no_such(kind, after, "starting_after")
            rest = items[ids.index(after) + 1 :]
            page, has_more = rest[:limit], len(rest) > limit
        elif before is not None:
            if before not in ids:
                raise no_such(kind, before, "ending_before")
            rest = items[: ids.index(before)]
            page, has_more = rest[-limit:], len(rest) > limit
        else:
            page, has_more = items[:limit], len(items) > limit
        return {"object": "list", "data": page, "has_more": has_more, "url": url}

    def _customer(self, ident: str, param: str | None = None) -> Obj:
        customer = self.customers.get(ident)
        if customer is None or ident in self._deleted_customers:
            raise no_such("customer", ident, param)
        return customer

    def _meter(self, ident: str) -> Obj:
        meter = self.meters.get(ident)
        if meter is None:
            raise no_such("billing.meter", ident)
        return meter

    def _meter_by_event_name(self, event_name: str) -> Obj | None:
        for meter in self.meters.values():
            if meter["event_name"] == event_name:
                return meter
        return None

    def _price(self, ident: str, param: str | None = None) -> Obj:
        price = self.prices.get(ident)
        if price is None:
            raise no_such("price", ident, param)
        return price

    @staticmethod
    def _price_view(price: Obj, expand_tiers: bool) -> Obj:
        view = dict(price)
        if not expand_tiers:
            view.pop("tiers", None)
        return view

    # ---- customers -----------------------------------------------------------------------------

    def _new_customer(
        self, *, email: str | None, name: str | None, metadata: dict[str, str]
    ) -> Obj:
        customer: Obj = {
            "id": _new_id("cus"),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": self._ts(),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": email,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": metadata,
            "name": name,
            "next_invoice_sequence": 1,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self.customers[customer["id"]] = customer
        return customer

    async def _create_customer(self, call: Call) -> Obj:
        p = call.params
        customer = self._new_customer(
            email=p.text("email", max_length=512),
            name=p.text("name", max_length=256),
            metadata=merge_metadata({}, p.metadata()),
        )
        customer["description"] = p.text("description")
        customer["phone"] = p.text("phone", max_length=20)
        return customer

    async def _list_customers(self, call: Call) -> Obj:
        email = call.params.text("email", max_length=512)
        items = [
            c
            for c in reversed(self.customers.values())
            if c["id"] not in self._deleted_customers and (email is None or c["email"] == email)
        ]
        return self._page(call, items, "/v1/customers", "customer")

    async def _get_customer(self, call: Call) -> Obj:
        ident = call.args["id"]
        if ident in self._deleted_customers:
            return {"id": ident, "object": "customer", "deleted": True}
        return self._customer(ident)

    async def _update_customer(self, call: Call) -> Obj:
        customer = self._customer(call.args["id"])
        p = call.params
        for key, max_length in (("email", 512), ("name", 256), ("description", 5000)):
            if p.given(key):
                customer[key] = p.text(key, max_length=max_length)
        if p.given("phone"):
            customer["phone"] = p.text("phone", max_length=20)
        customer["metadata"] = merge_metadata(customer["metadata"], p.metadata())
        return customer

    async def _delete_customer(self, call: Call) -> Obj:
        customer = self._customer(call.args["id"])
        self._deleted_customers.add(customer["id"])
        return {"id": customer["id"], "object": "customer", "deleted": True}

    # ---- products ------------------------------------------------------------------------------

    def _new_product(
        self, name: str, ident: str | None, active: bool, metadata: dict[str, str]
    ) -> Obj:
        if ident is not None and ident in self.products:
            raise invalid("Product already exists.", "id", "resource_already_exists")
        now = self._ts()
        product: Obj = {
            "id": ident or _new_id("prod"),
            "object": "product",
            "active": active,
            "created": now,
            "default_price": None,
            "description": None,
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": metadata,
            "name": name,
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": now,
            "url": None,
        }
        self.products[product["id"]] = product
        return product

    async def _create_product(self, call: Call) -> Obj:
        p = call.params
        ident = p.text("id", max_length=255)
        if ident is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", ident):
            raise invalid(f"Invalid id: {ident}", "id")
        name = p.req_text("name", max_length=250)
        product = self._new_product(
            name, ident, p.boolean("active") is not False, merge_metadata({}, p.metadata())
        )
        product["description"] = p.text("description", max_length=40_000)
        product["unit_label"] = p.text("unit_label", max_length=12)
        return product

    async def _list_products(self, call: Call) -> Obj:
        active = call.params.boolean("active")
        items = [
            prod
            for prod in reversed(self.products.values())
            if active is None or prod["active"] == active
        ]
        return self._page(call, items, "/v1/products", "product")

    async def _get_product(self, call: Call) -> Obj:
        product = self.products.get(call.args["id"])
        if product is None:
            raise no_such("product", call.args["id"])
        return product

    async def _update_product(self, call: Call) -> Obj:
        product = await self._get_product(call)
        p = call.params
        if p.given("name"):
            product["name"] = p.req_text("name", max_length=250)
        if p.given("description"):
            product["description"] = p.text("description", max_length=40_000)
        active = p.boolean("active")
        if active is not None:
            product["active"] = active
        product["metadata"] = merge_metadata(product["metadata"], p.metadata())
        product["updated"] = self._ts()
        return product

    # ---- prices --------------------------------------------------------------------------------

    async def _create_price(self, call: Call) -> Obj:
        p = call.params
        currency = p.req_text("currency").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise invalid(f"Invalid currency: {currency}.", "currency", "invalid_currency")
        product_id = p.text("product")
        product_data = p.child("product_data")
        if product_id is not None and product_data is not None:
            raise invalid("You may only specify one of these parameters: product, product_data.")
        if product_id is None and product_data is None:
            raise missing("product")
        if product_id is not None and product_id not in self.products:
            raise no_such("product", product_id, "product")

        scheme = p.text("billing_scheme", choices=("per_unit", "tiered")) or "per_unit"
        unit_amount = p.integer("unit_amount", minimum=0, maximum=99_999_999)
        unit_decimal = p.decimal("unit_amount_decimal")
        tiers_mode = p.text("tiers_mode", choices=("graduated", "volume"))
        tier_params = p.children("tiers")
        recurring = self._parse_recurring(p.child("recurring"))
        transform = p.child("transform_quantity")

        tiers: list[Obj] | None = None
        if scheme == "per_unit":
            if tier_params or tiers_mode is not None:
                raise invalid(
                    "You may only specify `tiers` and `tiers_mode` when `billing_scheme` is "
                    "`tiered`.",
                    "tiers" if tier_params else "tiers_mode",
                )
            if unit_amount is not None and unit_decimal is not None:
                raise invalid(
                    "You may only specify one of these parameters: unit_amount, "
                    "unit_amount_decimal.",
                    "unit_amount",
                )
            if unit_amount is None and unit_decimal is None:
                raise invalid(
                    "You must pass either `unit_amount` or `unit_amount_decimal` (or use "
                    "`billing_scheme=tiered`).",
                    "unit_amount",
                    "parameter_missing",
                )
            if unit_decimal is None:
                assert unit_amount is not None
                unit_decimal = Decimal(unit_amount)
            elif unit_decimal == unit_decimal.to_integral_value():
                unit_amount = int(unit_decimal)
        else:
            if unit_amount is not None or unit_decimal is not None:
                raise invalid(
                    "You may not specify `unit_amount` or `unit_amount_decimal` when "
                    "`billing_scheme=tiered`; put the amounts in `tiers`.",
                    "unit_amount" if unit_amount is not None else "unit_amount_decimal",
                )
            if tiers_mode is None:
                raise missing("tiers_mode")
            if not tier_params:
                raise missing("tiers")
            if recurring is None:
                raise invalid("Tiered prices must be recurring: set `recurring`.", "recurring")
            if transform is not None:
                raise invalid(
                    "`transform_quantity` cannot be combined with `billing_scheme=tiered`.",
                    "transform_quantity",
                )
            tiers = self._parse_tiers(tier_params)

        transform_quantity = None
        if transform is not None:
            transform_quantity = {
                "divide_by": transform.req_integer("divide_by", minimum=1),
                "round": transform.req_text("round", choices=("up", "down")),
            }

        lookup_key = p.text("lookup_key", max_length=200)
        transfer = p.boolean("transfer_lookup_key") is True
        holder = self._lookup_key_holder(lookup_key)
        if holder is not None and not transfer:
            raise invalid(
                f"A price (`{holder['id']}`) already uses that lookup key.",
                "lookup_key",
                "lookup_key_exists",
            )
        tax_behavior = p.text("tax_behavior", choices=("inclusive", "exclusive", "unspecified"))
        metadata = merge_metadata({}, p.metadata())
        nickname = p.text("nickname")
        active = p.boolean("active") is not False

        if product_data is not None:
            product_id = self._new_product(
                product_data.req_text("name", max_length=250),
                None,
                product_data.boolean("active") is not False,
                merge_metadata({}, product_data.metadata()),
            )["id"]
        if holder is not None:
            holder["lookup_key"] = None
        price: Obj = {
            "id": _new_id("price"),
            "object": "price",
            "active": active,
            "billing_scheme": scheme,
            "created": self._ts(),
            "currency": currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": lookup_key,
            "metadata": metadata,
            "nickname": nickname,
            "product": product_id,
            "recurring": recurring,
            "tax_behavior": tax_behavior or "unspecified",
            "tiers": tiers,
            "tiers_mode": tiers_mode,
            "transform_quantity": transform_quantity,
            "type": "recurring" if recurring is not None else "one_time",
            "unit_amount": unit_amount,
            "unit_amount_decimal": None if unit_decimal is None else str(unit_decimal),
        }
        self.prices[price["id"]] = price
        return self._price_view(price, "tiers" in call.expand)

    def _parse_recurring(self, recurring: Params | None) -> Obj | None:
        if recurring is None:
            return None
        interval = recurring.req_text("interval", choices=("day", "week", "month", "year"))
        count = recurring.integer(
            "interval_count", minimum=1, maximum=_MAX_INTERVAL_COUNT[interval]
        )
        usage_type = recurring.text("usage_type", choices=("licensed", "metered")) or "licensed"
        meter_id = recurring.text("meter")
        meter_param = recurring.name("meter")
        if usage_type == "metered":
            if meter_id is None:
                raise invalid(
                    "A meter is required for prices with `recurring[usage_type]=metered`. "
                    "Set `recurring[meter]` to the ID of an active billing meter.",
                    meter_param,
                    "parameter_missing",
                )
            meter = self.meters.get(meter_id)
            if meter is None:
                raise no_such("billing.meter", meter_id, meter_param)
            if meter["status"] != "active":
                raise invalid(f"The meter `{meter_id}` is inactive.", meter_param)
        elif meter_id is not None:
            raise invalid(
                "`recurring[meter]` can only be set when `recurring[usage_type]=metered`.",
                meter_param,
            )
        return {
            "interval": interval,
            "interval_count": count or 1,
            "meter": meter_id,
            "trial_period_days": None,
            "usage_type": usage_type,
        }

    @staticmethod
    def _parse_tiers(tier_params: list[Params]) -> list[Obj]:
        tiers: list[Obj] = []
        previous = 0
        for index, tier in enumerate(tier_params):
            last = index == len(tier_params) - 1
            raw_up_to = tier.req_text("up_to")
            up_to: int | None
            if raw_up_to == "inf":
                if not last:
                    raise invalid("Only the last tier may have `up_to=inf`.", tier.name("up_to"))
                up_to = None
            else:
                up_to = tier.req_integer("up_to", minimum=1)
                if up_to <= previous:
                    raise invalid(
                        "Tiers must be in ascending order of `up_to`.", tier.name("up_to")
                    )
                if last:
                    raise invalid("The last tier must have `up_to=inf`.", tier.name("up_to"))
                previous = up_to
            unit = tier.integer("unit_amount", minimum=0)
            unit_dec = tier.decimal("unit_amount_decimal")
            flat = tier.integer("flat_amount", minimum=0)
            flat_dec = tier.decimal("flat_amount_decimal")
            if unit is not None and unit_dec is not None:
                raise invalid(
                    "You may only specify one of unit_amount and unit_amount_decimal.",
                    tier.name("unit_amount"),
                )
            if flat is not None and flat_dec is not None:
                raise invalid(
                    "You may only specify one of flat_amount and flat_amount_decimal.",
                    tier.name("flat_amount"),
                )
            if unit is None and unit_dec is None and flat is None and flat_dec is None:
                raise invalid(
                    "Each tier needs `unit_amount`, `unit_amount_decimal`, `flat_amount` or "
                    "`flat_amount_decimal`.",
                    tier.name("unit_amount"),
                )
            if unit_dec is None and unit is not None:
                unit_dec = Decimal(unit)
            if flat_dec is None and flat is not None:
                flat_dec = Decimal(flat)
            tiers.append(
                {
                    "flat_amount": flat,
                    "flat_amount_decimal": None if flat_dec is None else str(flat_dec),
                    "unit_amount": unit,
                    "unit_amount_decimal": None if unit_dec is None else str(unit_dec),
                    "up_to": up_to,
                }
            )
        return tiers

    def _lookup_key_holder(self, lookup_key: str | None) -> Obj | None:
        if lookup_key is None:
            return None
        for price in self.prices.values():
            if price["lookup_key"] == lookup_key:
                return price
        return None

    async def _list_prices(self, call: Call) -> Obj:
        p = call.params
        lookup_keys = p.strings("lookup_keys")
        if len(lookup_keys) > 10:
            raise invalid("You may pass at most 10 `lookup_keys`.", "lookup_keys")
        active = p.boolean("active")
        currency = p.text("currency")
        product = p.text("product")
        kind = p.text("type", choices=("one_time", "recurring"))
        recurring = p.child("recurring")
        usage_type = interval = meter = None
        if recurring is not None:
            usage_type = recurring.text("usage_type", choices=("licensed", "metered"))
            interval = recurring.text("interval", choices=("day", "week", "month", "year"))
            meter = recurring.text("meter")

        def keep(price: Obj) -> bool:
            rec = price["recurring"] or {}
            return (
                (not lookup_keys or price["lookup_key"] in lookup_keys)
                and (active is None or price["active"] == active)
                and (currency is None or price["currency"] == currency.lower())
                and (product is None or price["product"] == product)
                and (kind is None or price["type"] == kind)
                and (usage_type is None or rec.get("usage_type") == usage_type)
                and (interval is None or rec.get("interval") == interval)
                and (meter is None or rec.get("meter") == meter)
            )

        expand = "data.tiers" in call.expand
        items = [self._price_view(x, expand) for x in reversed(self.prices.values()) if keep(x)]
        return self._page(call, items, "/v1/prices", "price")

    async def _get_price(self, call: Call) -> Obj:
        return self._price_view(self._price(call.args["id"]), "tiers" in call.expand)

    async def _update_price(self, call: Call) -> Obj:
        price = self._price(call.args["id"])
        p = call.params
        active = p.boolean("active")
        if active is not None:
            price["active"] = active
        if p.given("nickname"):
            price["nickname"] = p.text("nickname")
        if p.given("lookup_key"):
            lookup_key = p.text("lookup_key", max_length=200)
            holder = self._lookup_key_holder(lookup_key)
            if holder is not None and holder is not price:
                if p.boolean("transfer_lookup_key") is not True:
                    raise invalid(
                        f"A price (`{holder['id']}`) already uses that lookup key.",
                        "lookup_key",
                        "lookup_key_exists",
                    )
                holder["lookup_key"] = None
            price["lookup_key"] = lookup_key
        price["metadata"] = merge_metadata(price["metadata"], p.metadata())
        return self._price_view(price, "tiers" in call.expand)

    # ---- meters --------------------------------------------------------------------------------

    def _new_meter(
        self,
        display_name: str,
        event_name: str,
        formula: str,
        customer_key: str,
        value_key: str,
        window: str | None,
    ) -> Obj:
        now = self._ts()
        meter: Obj = {
            "id": _new_id("mtr"),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": window,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {"event_payload_key": value_key},
        }
        self.meters[meter["id"]] = meter
        return meter

    async def _create_meter(self, call: Call) -> Obj:
        p = call.params
        display_name = p.req_text("display_name", max_length=250)
        event_name = p.req_text("event_name", max_length=100)
        aggregation = p.child("default_aggregation", required=True)
        assert aggregation is not None
        formula = aggregation.req_text("formula", choices=("sum", "count", "last"))
        customer_key = "stripe_customer_id"
        mapping = p.child("customer_mapping")
        if mapping is not None:
            mapping.req_text("type", choices=("by_id",))
            customer_key = mapping.req_text("event_payload_key", max_length=100)
        value_key = "value"
        settings = p.child("value_settings")
        if settings is not None:
            value_key = settings.req_text("event_payload_key", max_length=100)
        window = p.text("event_time_window", choices=("hour", "day"))
        if self._meter_by_event_name(event_name) is not None:
            raise invalid(
                f"A meter with event_name `{event_name}` already exists.",
                "event_name",
                "resource_already_exists",
            )
        return self._new_meter(display_name, event_name, formula, customer_key, value_key, window)

    async def _list_meters(self, call: Call) -> Obj:
        status = call.params.text("status", choices=("active", "inactive"))
        items = [
            m for m in reversed(self.meters.values()) if status is None or m["status"] == status
        ]
        return self._page(call, items, "/v1/billing/meters", "billing.meter")

    async def _get_meter(self, call: Call) -> Obj:
        return self._meter(call.args["id"])

    async def _update_meter(self, call: Call) -> Obj:
        meter = self._meter(call.args["id"])
        if call.params.given("display_name"):
            meter["display_name"] = call.params.req_text("display_name", max_length=250)
            meter["updated"] = self._ts()
        return meter

    async def _deactivate_meter(self, call: Call) -> Obj:
        meter = self._meter(call.args["id"])
        if meter["status"] == "active":
            now = self._ts()
            meter["status"] = "inactive"
            meter["status_transitions"] = {"deactivated_at": now}
            meter["updated"] = now
        return meter

    async def _reactivate_meter(self, call: Call) -> Obj:
        meter = self._meter(call.args["id"])
        if meter["status"] == "inactive":
            meter["status"] = "active"
            meter["status_transitions"] = {"deactivated_at": None}
            meter["updated"] = self._ts()
        return meter

    # ---- meter events --------------------------------------------------------------------------

    async def _create_meter_event(self, call: Call) -> Obj:
        p = call.params
        event_name = p.req_text("event_name", max_length=100)
        payload = p.string_map("payload", required=True)
        assert payload is not None
        identifier = p.text("identifier", max_length=100)
        timestamp = p.integer("timestamp")
        now = self._ts()
        if identifier is None:
            identifier = str(uuid.uuid4())
        elif identifier in self._identifiers:
            raise self._duplicate(identifier)
        if timestamp is None:
            timestamp = now
        elif timestamp < now - METER_EVENT_MAX_AGE:
            raise invalid(
                "The timestamp must be within the past 35 calendar days.",
                "timestamp",
                "timestamp_too_far_in_past",
            )
        elif timestamp > now + METER_EVENT_MAX_FUTURE:
            raise invalid(
                "The timestamp must be no more than 5 minutes in the future.",
                "timestamp",
                "timestamp_in_future",
            )

        meter = self._meter_by_event_name(event_name)
        if meter is None:
            raise invalid(
                f"No active meter was found for event_name `{event_name}`.",
                "event_name",
                "no_meter",
            )
        if meter["status"] != "active":
            raise invalid(
                f"The meter for event_name `{event_name}` ({meter['id']}) is inactive.",
                "event_name",
                "archived_meter",
            )
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer = payload.get(customer_key)
        if not customer:
            raise invalid(
                f"The payload has no `{customer_key}`, which meter {meter['id']} maps to the "
                "customer.",
                f"payload[{customer_key}]",
                "meter_event_no_customer_defined",
            )
        if customer not in self.customers or customer in self._deleted_customers:
            raise invalid(
                f"No such customer: '{customer}'",
                f"payload[{customer_key}]",
                "meter_event_customer_not_found",
            )
        value_key = meter["value_settings"]["event_payload_key"]
        raw_value = payload.get(value_key)
        if raw_value is None and meter["default_aggregation"]["formula"] == "count":
            value = 1
        elif raw_value is None:
            raise invalid(
                f"The payload has no `{value_key}`, the value key of meter {meter['id']}.",
                f"payload[{value_key}]",
                "meter_event_invalid_value",
            )
        elif not _INT.fullmatch(raw_value):
            raise invalid(
                f"Invalid value `{raw_value}` for `payload[{value_key}]`: meter event values "
                "must be whole numbers.",
                f"payload[{value_key}]",
                "meter_event_invalid_value",
            )
        else:
            value = int(raw_value)

        slot = (customer, meter["id"])
        if slot in self._in_flight:
            raise rate_limited(
                "Too many concurrent requests: a meter event for this customer and meter is "
                "already being processed. Only one concurrent call per customer per meter is "
                "allowed."
            )
        self._in_flight.add(slot)
        try:
            if self.meter_event_delay > 0:
                await asyncio.sleep(self.meter_event_delay)
            if identifier in self._identifiers:  # a concurrent twin was recorded first
                raise self._duplicate(identifier)
            self._identifiers.add(identifier)
            self.meter_events.append(
                AcceptedEvent(
                    identifier=identifier,
                    event_name=event_name,
                    customer=customer,
                    value=value,
                    timestamp=timestamp,
                    meter=meter["id"],
                    payload=payload,
                    created=self._ts(),
                )
            )
        finally:
            self._in_flight.discard(slot)
        return {
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": payload,
            "timestamp": timestamp,
        }

    @staticmethod
    def _duplicate(identifier: str) -> StripeError:
        return StripeError(
            400,
            f"An event already exists with identifier {identifier}.",
            code="resource_already_exists",
            headers={"Stripe-Should-Retry": "false"},
        )

    async def _create_adjustment(self, call: Call) -> Obj:
        p = call.params
        event_name = p.req_text("event_name", max_length=100)
        p.req_text("type", choices=("cancel",))
        cancel = p.child("cancel", required=True)
        assert cancel is not None
        identifier = cancel.req_text("identifier", max_length=100)
        param = cancel.name("identifier")
        event = next((e for e in self.meter_events if e.identifier == identifier), None)
        if event is None:
            raise invalid(
                f"No meter event with identifier {identifier} was found.", param, "resource_missing"
            )
        if event.event_name != event_name:
            raise invalid(
                f"The meter event {identifier} has event_name `{event.event_name}`, not "
                f"`{event_name}`.",
                "event_name",
            )
        if event.cancelled:
            raise invalid(f"The meter event {identifier} has already been cancelled.", param)
        if self._ts() - event.created > ADJUSTMENT_WINDOW:
            raise invalid(
                "Meter events can only be cancelled within 24 hours of being received.", param
            )
        event.cancelled = True
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }

    async def _event_summaries(self, call: Call) -> Obj:
        meter = self._meter(call.args["id"])
        p = call.params
        customer = p.req_text("customer")
        self._customer(customer, "customer")
        start = p.req_integer("start_time", minimum=0)
        end = p.req_integer("end_time", minimum=0)
        window = p.text("value_grouping_window", choices=("hour", "day"))
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise invalid(f"{name} must be aligned with minute boundaries.", name)
        if start >= end:
            raise invalid("start_time must be before end_time.", "start_time")
        step = end - start
        if window is not None:
            step = 3600 if window == "hour" else DAY
            for name, value in (("start_time", start), ("end_time", end)):
                if value % step:
                    raise invalid(
                        f"{name} must be aligned with {window} boundaries when "
                        f"value_grouping_window={window}.",
                        name,
                    )
            if (end - start) // step > 10_000:
                raise invalid("The time range holds too many windows.", "end_time")
        events = [
            e
            for e in self.meter_events
            if e.meter == meter["id"] and e.customer == customer and not e.cancelled
        ]
        formula = meter["default_aggregation"]["formula"]
        summaries = []
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            inside = [e for e in events if lo <= e.timestamp < hi]
            if formula == "sum":
                aggregated = sum(e.value for e in inside)
            elif formula == "count":
                aggregated = len(inside)
            else:  # last: the newest event by timestamp, arrival order breaking ties
                aggregated = max(inside, key=lambda e: e.timestamp).value if inside else 0
            digest = hashlib.sha256(f"{meter['id']}|{customer}|{lo}|{hi}".encode()).hexdigest()
            summaries.append(
                {
                    "id": f"mtrusg_{digest[:24]}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": aggregated,
                    "end_time": hi,
                    "livemode": False,
                    "meter": meter["id"],
                    "start_time": lo,
                }
            )
        url = f"/v1/billing/meters/{meter['id']}/event_summaries"
        return self._page(call, summaries, url, "billing.meter_event_summary")

    # ---- subscriptions -------------------------------------------------------------------------

    def _item_price(self, item: Params, *, required: bool = True) -> Obj | None:
        price_id = item.text("price") if not required else item.req_text("price")
        if price_id is None:
            return None
        param = item.name("price")
        price = self._price(price_id, param)
        if not price["active"]:
            raise invalid(
                "The price specified is inactive. This field only accepts active prices.", param
            )
        if price["recurring"] is None:
            raise invalid(
                "The price specified is set to `type=one_time` but this field only accepts "
                "prices with `type=recurring`.",
                param,
            )
        return price

    @staticmethod
    def _item_quantity(item: Params, price: Obj) -> int | None:
        if price["recurring"]["usage_type"] == "metered":
            if item.given("quantity"):
                raise invalid(
                    "Quantity should not be specified where usage_type is `metered`. Remove "
                    f"quantity from `{item.name('quantity').rsplit('[', 1)[0]}`.",
                    item.name("quantity"),
                )
            return None
        quantity = item.integer("quantity", minimum=0)
        return 1 if quantity is None else quantity

    def _new_item(
        self,
        subscription: Obj,
        price: Obj,
        quantity: int | None,
        metadata: dict[str, str],
        period: tuple[int, int],
    ) -> Obj:
        recurring = price["recurring"]
        plan = {
            "id": price["id"],
            "object": "plan",
            "active": price["active"],
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"],
            "created": price["created"],
            "currency": price["currency"],
            "interval": recurring["interval"],
            "interval_count": recurring["interval_count"],
            "livemode": False,
            "metadata": price["metadata"],
            "meter": recurring["meter"],
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": price["tiers_mode"],
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": recurring["usage_type"],
        }
        return {
            "id": _new_id("si"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": self._ts(),
            "current_period_end": period[1],
            "current_period_start": period[0],
            "discounts": [],
            "metadata": metadata,
            "plan": plan,
            "price": self._price_view(price, False),
            "quantity": quantity,
            "subscription": subscription["id"],
            "tax_rates": [],
        }

    def _period(self, subscription: Obj, price: Obj) -> tuple[int, int]:
        start = subscription["start_date"]
        if subscription["trial_end"] is not None and subscription["trial_end"] > self._ts():
            return start, subscription["trial_end"]
        recurring = price["recurring"]
        return start, add_interval(start, recurring["interval"], recurring["interval_count"])

    def _new_subscription(
        self,
        customer: str,
        items: list[tuple[Obj, int | None, dict[str, str]]],
        metadata: dict[str, str],
        trial_days: int | None,
        description: str | None,
    ) -> Obj:
        now = self._ts()
        trial_end = now + trial_days * DAY if trial_days else None
        subscription: Obj = {
            "id": _new_id("sub"),
            "object": "subscription",
            "application": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": trial_end or now,
            "billing_mode": {"type": "flexible"},
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": items[0][0]["currency"],
            "customer": customer,
            "days_until_due": None,
            "default_payment_method": None,
            "description": description,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {},
            "latest_invoice": None,
            "livemode": False,
            "metadata": metadata,
            "pause_collection": None,
            "start_date": now,
            "status": "trialing" if trial_end else "active",
            "test_clock": None,
            "trial_end": trial_end,
            "trial_start": now if trial_end else None,
        }
        data = [
            self._new_item(
                subscription, price, quantity, item_metadata, self._period(subscription, price)
            )
            for price, quantity, item_metadata in items
        ]
        self._set_items(subscription, data)
        self.subscriptions[subscription["id"]] = subscription
        return subscription

    @staticmethod
    def _set_items(subscription: Obj, data: list[Obj]) -> None:
        subscription["items"] = {
            "object": "list",
            "data": data,
            "has_more": False,
            "total_count": len(data),
            "url": f"/v1/subscription_items?subscription={subscription['id']}",
        }

    @staticmethod
    def _check_items(items: list[tuple[Obj, int | None, dict[str, str]]], param: str) -> None:
        seen: set[str] = set()
        for price, _, _ in items:
            if price["id"] in seen:
                raise invalid(
                    f"Cannot add multiple subscription items with the same price: {price['id']}",
                    param,
                )
            seen.add(price["id"])
            if price["currency"] != items[0][0]["currency"]:
                raise invalid("All prices on a subscription must have the same `currency`.", param)

    async def _create_subscription(self, call: Call) -> Obj:
        p = call.params
        customer = self._customer(p.req_text("customer"), "customer")["id"]
        items: list[tuple[Obj, int | None, dict[str, str]]] = []
        for item in p.children("items", required=True):
            price = self._item_price(item)
            assert price is not None
            quantity = self._item_quantity(item, price)
            items.append((price, quantity, merge_metadata({}, item.metadata())))
        self._check_items(items, "items")
        trial_days = p.integer("trial_period_days", minimum=1, maximum=730)
        subscription = self._new_subscription(
            customer,
            items,
            merge_metadata({}, p.metadata()),
            trial_days,
            p.text("description", max_length=500),
        )
        if p.boolean("cancel_at_period_end"):
            self._cancel_at_period_end(subscription, True)
        return subscription

    @staticmethod
    def _cancel_at_period_end(subscription: Obj, flag: bool) -> None:
        subscription["cancel_at_period_end"] = flag
        ends = [i["current_period_end"] for i in subscription["items"]["data"]]
        subscription["cancel_at"] = min(ends) if flag and ends else None

    async def _list_subscriptions(self, call: Call) -> Obj:
        p = call.params
        customer = p.text("customer")
        statuses = (
            "active",
            "all",
            "canceled",
            "ended",
            "incomplete",
            "incomplete_expired",
            "past_due",
            "paused",
            "trialing",
            "unpaid",
        )
        status = p.text("status", choices=statuses)
        price = p.text("price")

        def keep(sub: Obj) -> bool:
            if status is None and sub["status"] == "canceled":
                return False  # Stripe omits canceled subscriptions unless asked
            if status not in (None, "all", "ended") and sub["status"] != status:
                return False
            if status == "ended" and sub["status"] not in ("canceled", "incomplete_expired"):
                return False
            if customer is not None and sub["customer"] != customer:
                return False
            return price is None or any(i["price"]["id"] == price for i in sub["items"]["data"])

        items = [s for s in reversed(self.subscriptions.values()) if keep(s)]
        return self._page(call, items, "/v1/subscriptions", "subscription")

    def _subscription(self, ident: str) -> Obj:
        subscription = self.subscriptions.get(ident)
        if subscription is None:
            raise no_such("subscription", ident)
        return subscription

    async def _get_subscription(self, call: Call) -> Obj:
        return self._subscription(call.args["id"])

    async def _update_subscription(self, call: Call) -> Obj:
        subscription = self._subscription(call.args["id"])
        p = call.params
        item_params = p.children("items")
        if subscription["status"] == "canceled" and (
            item_params or p.given("cancel_at_period_end") or p.given("description")
        ):
            raise invalid(
                "A canceled subscription can only update its cancellation_details and metadata."
            )
        p.text("proration_behavior", choices=("always_invoice", "create_prorations", "none"))
        data: list[Obj] = list(subscription["items"]["data"])
        for item in item_params:
            item_id = item.text("id")
            if item_id is None:
                price = self._item_price(item)
                assert price is not None
                quantity = self._item_quantity(item, price)
                data.append(
                    self._new_item(
                        subscription,
                        price,
                        quantity,
                        merge_metadata({}, item.metadata()),
                        self._period(subscription, price),
                    )
                )
                continue
            index = next((n for n, d in enumerate(data) if d["id"] == item_id), None)
            if index is None:
                raise no_such("subscription item", item_id, item.name("id"))
            if item.boolean("deleted"):
                del data[index]
                continue
            current = dict(data[index])
            price = self._item_price(item, required=False)
            if price is not None and price["id"] != current["price"]["id"]:
                replacement = self._new_item(
                    subscription,
                    price,
                    self._item_quantity(item, price),
                    current["metadata"],
                    self._period(subscription, price),
                )
                replacement["id"] = current["id"]
                current = replacement
            elif item.given("quantity"):
                current["quantity"] = self._item_quantity(item, self._price(current["price"]["id"]))
            current["metadata"] = merge_metadata(current["metadata"], item.metadata())
            data[index] = current
        if not data:
            raise invalid("A subscription must have at least one item.", "items")
        self._check_items(
            [(self._price(d["price"]["id"]), d["quantity"], d["metadata"]) for d in data], "items"
        )
        self._set_items(subscription, data)
        subscription["metadata"] = merge_metadata(subscription["metadata"], p.metadata())
        if p.given("description"):
            subscription["description"] = p.text("description", max_length=500)
        flag = p.boolean("cancel_at_period_end")
        if flag is not None:
            self._cancel_at_period_end(subscription, flag)
        return subscription

    async def _cancel_subscription(self, call: Call) -> Obj:
        subscription = self._subscription(call.args["id"])
        call.params.boolean("invoice_now")
        call.params.boolean("prorate")
        if subscription["status"] == "canceled":
            raise invalid(
                f"The subscription {subscription['id']} has already been canceled.",
                code="resource_missing",
            )
        now = self._ts()
        subscription.update(
            {
                "status": "canceled",
                "canceled_at": now,
                "ended_at": now,
                "cancel_at_period_end": False,
                "cancellation_details": {
                    "comment": None,
                    "feedback": None,
                    "reason": "cancellation_requested",
                },
            }
        )
        return subscription

    # ---- billing portal and checkout -----------------------------------------------------------

    async def _create_portal_session(self, call: Call) -> Obj:
        p = call.params
        customer = self._customer(p.req_text("customer"), "customer")["id"]
        return_url = p.url("return_url")
        ident = _new_id("bps")
        session: Obj = {
            "id": ident,
            "object": "billing_portal.session",
            "configuration": "bpc_fake_default",
            "created": self._ts(),
            "customer": customer,
            "flow": None,
            "livemode": False,
            "locale": None,
            "on_behalf_of": None,
            "return_url": return_url,
            "url": f"https://billing.stripe.test/session/{ident}",
        }
        self.portal_sessions[ident] = session
        return session

    async def _create_checkout_session(self, call: Call) -> Obj:
        p = call.params
        mode = p.req_text("mode", choices=("payment", "setup", "subscription"))
        success_url = p.url("success_url", required=True)
        cancel_url = p.url("cancel_url")
        customer = p.text("customer")
        customer_email = p.text("customer_email", max_length=800)
        if customer is not None and customer_email is not None:
            raise invalid("You may only specify one of these parameters: customer, customer_email.")
        if customer is not None:
            self._customer(customer, "customer")
        reference = p.text("client_reference_id", max_length=200)
        subscription_data = p.child("subscription_data")
        if subscription_data is not None and mode != "subscription":
            raise invalid(
                f"You can not pass `subscription_data` in `{mode}` mode.", "subscription_data"
            )
        trial_days = None
        sub_metadata: dict[str, str] = {}
        if subscription_data is not None:
            trial_days = subscription_data.integer("trial_period_days", minimum=1, maximum=730)
            sub_metadata = merge_metadata({}, subscription_data.metadata())
        p.boolean("allow_promotion_codes")

        line_params = p.children("line_items")
        if mode == "setup" and line_params:
            raise invalid("You can not pass `line_items` in `setup` mode.", "line_items")
        if mode != "setup" and not line_params:
            raise missing("line_items")
        lines: list[tuple[str, int | None]] = []
        currency = None
        total = 0
        for line in line_params:
            price_param = line.name("price")
            price = self._price(line.req_text("price"), price_param)
            if not price["active"]:
                raise invalid(
                    "The price specified is inactive. This field only accepts active prices.",
                    price_param,
                )
            metered = price["recurring"] is not None and (
                price["recurring"]["usage_type"] == "metered"
            )
            quantity_param = line.name("quantity")
            if metered and line.given("quantity"):
                raise invalid(
                    "Quantity should not be specified where usage_type is `metered`. Remove "
                    f"quantity from `{line.name('price').rsplit('[', 1)[0]}`.",
                    quantity_param,
                )
            quantity = None
            if not metered:
                quantity = line.integer("quantity", minimum=1, maximum=999_999)
                if quantity is None:
                    raise invalid(
                        "Quantity is required. Add `quantity` to "
                        f"`{line.name('price').rsplit('[', 1)[0]}`.",
                        quantity_param,
                        "parameter_missing",
                    )
                total += (price["unit_amount"] or 0) * quantity
            if mode == "payment" and price["recurring"] is not None:
                raise invalid(
                    "You specified `payment` mode but passed a recurring price. Either switch to "
                    "`subscription` mode or use only one-time prices.",
                    price_param,
                )
            if currency is not None and price["currency"] != currency:
                raise invalid("All line items must have the same currency.", price_param)
            currency = price["currency"]
            lines.append((price["id"], quantity))
        if mode == "subscription" and not any(self.prices[x]["recurring"] for x, _ in lines):
            raise invalid(
                "You must provide at least one recurring price in `subscription` mode when "
                "using prices.",
                "line_items",
            )
        metadata = merge_metadata({}, p.metadata())
        ident = f"cs_test_{secrets.token_hex(16)}"
        now = self._ts()
        session: Obj = {
            "id": ident,
            "object": "checkout.session",
            "amount_subtotal": total if mode != "setup" else None,
            "amount_total": total if mode != "setup" else None,
            "cancel_url": cancel_url,
            "client_reference_id": reference,
            "created": now,
            "currency": currency,
            "customer": customer,
            "customer_email": customer_email,
            "expires_at": now + DAY,
            "livemode": False,
            "metadata": metadata,
            "mode": mode,
            "payment_intent": None,
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "setup_intent": None,
            "status": "open",
            "subscription": None,
            "success_url": success_url,
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.test/c/pay/{ident}",
        }
        self.checkout_sessions[ident] = session
        self._checkout_lines[ident] = lines
        self._checkout_subscription_data[ident] = (sub_metadata, trial_days)
        return session

    async def _get_checkout_session(self, call: Call) -> Obj:
        session = self.checkout_sessions.get(call.args["id"])
        if session is None:
            raise no_such("checkout.session", call.args["id"])
        return session


@asynccontextmanager
async def run_stripe_fake(
    *, now: Callable[[], float] = time.time, api_key: str | None = None
) -> AsyncIterator[StripeFake]:
    """Start a :class:`StripeFake` on 127.0.0.1 (free port); stop it on exit."""
    fake = StripeFake(now=now, api_key=api_key)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
