"""The MCP endpoint: authenticate, gate, then stream the upstream's answer back untouched,
settling each gated call from its final response on the way through."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .auth import extract_key, key_offered
from .billing.plansync import effective_plan
from .clock import Clock
from .config import Config
from .directory import Directory
from .exchange import (
    Ctx,
    filter_tools,
    method_label,
    request_id_of,
    responses,
    sse_rewrite,
    status_outcome,
)
from .gate import GateResult, gate
from .headers import downstream_response_headers, origin_allowed, upstream_request_headers
from .jsonrpc import (
    INVALID_REQUEST,
    ORIGIN_FORBIDDEN,
    PAYLOAD_TOO_LARGE,
    SESSION_FORBIDDEN,
    STORE_UNAVAILABLE,
    UNAUTHORIZED,
    UPSTREAM_UNAVAILABLE,
    Body,
    RpcError,
    RpcId,
    dumps,
    is_modern,
    is_request,
    parse_body,
)
from .jsonrpc import error as rpc_error
from .metrics import Metrics
from .replies import (
    cors_headers,
    json_reply,
    preflight,
    reply_id,
    rpc_error_reply,
    unauthorized,
)
from .sessions import Sessions
from .settle import PendingCall, Settler
from .sse import SSEEventTooLarge, SSEParser
from .store import StoreUnavailable
from .tasks import TaskSet
from .tenants import Tenant
from .upstream import UpstreamBroken, UpstreamClient, UpstreamResponse, UpstreamUnreachable
from .usage.spool import SpoolError

log = structlog.get_logger(__name__)

MAX_METERED_JSON = 64 * 1024 * 1024


class McpProxy:
    def __init__(
        self,
        cfg: Config,
        upstream: UpstreamClient,
        directory: Directory,
        sessions: Sessions,
        settler: Settler,
        engine: Any,
        clock: Clock,
        tasks: TaskSet,
        metrics: Metrics,
    ) -> None:
        self._m = metrics
        self._cfg = cfg
        self._upstream = upstream
        self._directory = directory
        self._sessions = sessions
        self._settler = settler
        self._engine = engine
        self._clock = clock
        self._tasks = tasks

    # --- the request path -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ctx = Ctx(started=time.perf_counter(), method=request.method)
        self._m.inflight.inc()
        status = 500
        try:
            resp = await self._handle(request, ctx)
            status = resp.status
            return resp
        finally:
            self._m.inflight.dec()
            m = self._m
            m.child(m.requests, ctx.method, ctx.outcome or status_outcome(status)).inc()
            m.child(m.request_seconds, ctx.method).observe(time.perf_counter() - ctx.started)

    async def _handle(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, self._cfg.proxy.allowed_origins):
            return rpc_error_reply(
                403,
                ORIGIN_FORBIDDEN,
                f"Origin {origin!r} is not allowed; the operator can list it in "
                "proxy.allowed_origins",
            )
        cors = cors_headers(origin)
        if request.method == "OPTIONS":
            return preflight(origin)
        key = extract_key(request.headers)
        if key is None:
            offered = key_offered(request.headers)
            return _with(unauthorized(None, UNAUTHORIZED, key_offered=offered), cors)
        try:
            tenant, _ = await self._directory.authenticate(key)
        except StoreUnavailable:
            return rpc_error_reply(
                503,
                STORE_UNAVAILABLE,
                "The tenant store is unreachable, so the API key cannot be checked; retry shortly.",
                headers={"Retry-After": "5", **cors},
            )
        if tenant is None:
            return _with(unauthorized(None, UNAUTHORIZED, key_offered=True), cors)

        request_id = ctx.request_id = request_id_of(request.headers)
        ctx.tenant = tenant.id
        now = self._clock.time()
        plan = effective_plan(tenant, now, self._cfg)
        session_id = request.headers.get("Mcp-Session-Id")
        if session_id is not None and not _valid_session_id(session_id):
            return rpc_error_reply(
                400,
                INVALID_REQUEST,
                "Mcp-Session-Id must be 1-1024 visible ASCII characters; use the id the "
                "server returned from initialize.",
                headers=cors,
            )

        body = b""
        parsed: Body | None = None
        gated = GateResult()
        if request.method == "POST":
            if (request.content_length or 0) > self._cfg.proxy.max_body_bytes:
                # Refused before reading: a slow sender of a huge body must not hold a handler.
                return _too_large(self._cfg.proxy.max_body_bytes, {"Connection": "close", **cors})
            try:
                body = await _read_body(request, self._cfg.proxy.body_timeout_s)
            except web.HTTPRequestEntityTooLarge:
                return _too_large(self._cfg.proxy.max_body_bytes, cors)
            except RequestPayloadError:  # e.g. a body that is not the gzip it claims
                return rpc_error_reply(
                    400,
                    INVALID_REQUEST,
                    "The request body could not be read or decoded.",
                    headers=cors,
                )
            except TimeoutError:
                # A slow sender holds a connection and a buffer: cut it off.
                return rpc_error_reply(
                    408,
                    INVALID_REQUEST,
                    f"Request body not received within {self._cfg.proxy.body_timeout_s} s "
                    "(proxy.body_timeout_s).",
                    headers={"Connection": "close", **cors},
                )
            try:
                parsed = parse_body(body)
            except RpcError as exc:
                return rpc_error_reply(400, exc.code, exc.message, exc.rpc_id, cors)
            ctx.method = method_label(parsed)
        elif request.method not in ("GET", "DELETE"):
            return rpc_error_reply(
                405,
                INVALID_REQUEST,
                "Use POST, GET or DELETE on this endpoint.",
                headers={"Allow": "GET, POST, DELETE, OPTIONS", **cors},
            )
        if session_id is not None:
            # Checked once the body is parsed, so the answer carries the request's id; and
            # before gating, so a foreign session never reserves anything.
            owner = await self._sessions.owner(session_id)
            if owner is not None and owner != tenant.id:
                return rpc_error_reply(
                    404,
                    SESSION_FORBIDDEN,
                    "Session not found for this API key; start a new session (initialize).",
                    reply_id(parsed),
                    cors,
                )
        if parsed is not None:
            try:
                gated = await gate(
                    parsed,
                    tenant,
                    plan,
                    self._engine,
                    self._cfg.proxy,
                    modern=is_modern(request.headers.get("MCP-Protocol-Version")),
                    request_id=request_id,
                    session_id=session_id,
                    now=now,
                )
            except RpcError as exc:
                return rpc_error_reply(400, exc.code, exc.message, exc.rpc_id, cors)
            self._observe_gate(ctx, gated)
            if gated.replies:
                ctx.outcome = "answered_here"
                return await self._answer_here(parsed, gated, cors)
        initialize = parsed is not None and any(
            m.get("method") == "initialize" for m in parsed.messages
        )
        return await self._forward(
            request,
            body,
            tenant,
            gated,
            session_id,
            ctx,
            cors,
            initialize=initialize,
            hidden=plan.hidden_tools,
            parsed=parsed,
        )

    async def _answer_here(
        self, parsed: Body, gated: GateResult, cors: dict[str, str]
    ) -> web.Response:
        if not parsed.batch:
            return json_reply(next(iter(gated.replies.values())), headers=cors)
        # One refused element refuses the batch: partial batches would need re-serialising
        # the body and merging replies. Batches exist only in 2025-03-26.
        for call in gated.pending.values():
            await self._settler.refund(call)
        replies = [
            gated.replies.get(m["id"])
            or rpc_error(
                m["id"],
                INVALID_REQUEST,
                "Not run: another call in this batch was refused; send it on its own.",
            )
            for m in parsed.messages
            if is_request(m)
        ]
        return json_reply(replies, headers=cors)

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        tenant: Tenant,
        gated: GateResult,
        session_id: str | None,
        ctx: Ctx,
        cors: dict[str, str],
        *,
        initialize: bool,
        hidden: frozenset[str],
        parsed: Body | None,
    ) -> web.StreamResponse:
        request_id = ctx.request_id
        outstanding = dict(gated.pending)
        headers = upstream_request_headers(
            request.headers.items(), self._cfg.proxy.tenant_header, tenant.id
        )
        headers["X-Request-Id"] = request_id
        resumable = False
        try:
            try:
                sent = time.perf_counter()
                self._m.overhead_seconds.observe(sent - ctx.started)
                up = await self._upstream.request(
                    request.method, request.path_qs, headers.items(), body
                )
                ctx.upstream_s = time.perf_counter() - sent
                self._m.child(self._m.upstream_seconds, ctx.method).observe(ctx.upstream_s)
                ctx.upstream_status = up.status
            except UpstreamUnreachable as exc:
                ctx.outcome = "upstream_unreachable"
                await self._refund(outstanding)
                log.warning("upstream_unreachable", error=str(exc))
                return rpc_error_reply(
                    502,
                    UPSTREAM_UNAVAILABLE,
                    "The MCP server behind this proxy is unreachable; retry shortly.",
                    reply_id(parsed),
                    cors,
                )
            try:
                headers = downstream_response_headers(up.headers)
                headers.update(cors)
                new_session = up.headers.get("Mcp-Session-Id")
                if new_session and initialize and up.status < 300:
                    await self._sessions.bind(new_session, tenant.id)
                if request.method == "DELETE" and session_id and up.status < 300:
                    await self._refund_calls(await self._sessions.forget(session_id))
                ctype = up.headers.get("Content-Type", "").lower()
                watch = (
                    request.method == "GET"
                    and session_id is not None
                    and self._sessions.deferred(session_id) is not None
                )
                metering = bool(outstanding or gated.list_ids)
                if up.status >= 300:
                    await self._refund(outstanding)
                if metering and ctype.startswith("application/json"):
                    # A JSON reply is complete before it can be settled, so it goes out whole:
                    # one write with Content-Length instead of chunks.
                    try:
                        raw = await self._settle_json(up, outstanding, gated.list_ids, hidden, ctx)
                    except UpstreamBroken as exc:
                        # Nothing was sent yet, so the client can get a clean answer.
                        ctx.outcome = "upstream_broken"
                        await self._refund(outstanding)
                        log.warning("upstream_stream_broken", request_id=request_id, error=str(exc))
                        return rpc_error_reply(
                            502,
                            UPSTREAM_UNAVAILABLE,
                            "The MCP server's reply broke off or was too large; retry shortly.",
                            reply_id(parsed),
                            cors,
                        )
                    if outstanding:
                        await self._refund(outstanding)  # not answered in the reply
                    return web.Response(
                        status=up.status, reason=up.reason, body=raw, headers=headers
                    )
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
                await resp.prepare(request)
                if (metering or watch) and ctype.startswith("text/event-stream"):
                    self._m.open_streams.inc()
                    try:
                        resumable = await self._pump_sse(
                            up,
                            resp,
                            outstanding,
                            gated.list_ids,
                            hidden,
                            ctx,
                            session_id if watch else None,
                        )
                    finally:
                        self._m.open_streams.dec()
                else:
                    streaming = ctype.startswith("text/event-stream")
                    if streaming:
                        self._m.open_streams.inc()
                    try:
                        async for chunk in up.iter_any():
                            await resp.write(chunk)
                    finally:
                        if streaming:
                            self._m.open_streams.dec()
                if outstanding:
                    # Stream ended without a result. In a resumable legacy session it may still
                    # come on a GET stream (SEP-1699); otherwise closing it is cancellation.
                    if resumable and session_id is not None:
                        deadline = self._clock.monotonic() + self._cfg.proxy.resume_grace_s
                        self._sessions.defer(session_id, list(outstanding.values()), deadline)
                        outstanding.clear()
                    else:
                        await self._refund(outstanding)
                await resp.write_eof()
                return resp
            finally:
                self._upstream.release(up)
        except UpstreamBroken:
            # Re-raised so aiohttp cuts the client's transfer short: after the head went out,
            # an unfinished body is the only honest signal left.
            log.warning("upstream_stream_broken", request_id=request_id)
            raise
        except SSEEventTooLarge as exc:
            # Nothing can be forwarded after a cut event: end the client's transfer unfinished,
            # as for a broken upstream stream (the finally below refunds what is outstanding).
            log.warning("upstream_event_too_large", request_id=request_id, error=str(exc))
            raise UpstreamBroken("upstream SSE event too large") from exc
        finally:
            if outstanding:
                # Cancelled (client went away) or failed mid-stream: refund off the handler's
                # task, which may be cancelled again at any await.
                calls = list(outstanding.values())
                outstanding.clear()
                self._tasks.spawn(self._refund_calls(calls), name="refund")

    # --- pumps ------------------------------------------------------------------------------

    async def _pump_sse(
        self,
        up: UpstreamResponse,
        resp: web.StreamResponse,
        outstanding: dict[RpcId, PendingCall],
        list_ids: set[RpcId],
        hidden: frozenset[str],
        ctx: Ctx,
        watch_session: str | None,
    ) -> bool:
        """Forward event by event; a call's result is released only after it is settled.
        Returns whether the stream carried event ids (so the client can resume it)."""
        parser = SSEParser()
        saw_id = False
        async for chunk in up.iter_any():
            out: list[bytes] = []
            for event in parser.feed(chunk):
                saw_id = saw_id or event.id is not None
                raw = event.raw
                for message in responses(event.data):
                    rpc_id = message["id"]
                    call = outstanding.pop(rpc_id, None)
                    if call is None and watch_session is not None:
                        call = self._sessions.take(watch_session, rpc_id)
                    if call is not None:
                        if out:
                            await resp.write(b"".join(out))
                            out.clear()
                        await self._settle(call, message, ctx)
                    elif rpc_id in list_ids:
                        raw = sse_rewrite(event, filter_tools(message, hidden))
                out.append(raw)
            if out:
                await resp.write(b"".join(out))
        tail = parser.pending_bytes()
        if tail:
            await resp.write(tail)
        return saw_id

    async def _settle_json(
        self,
        up: UpstreamResponse,
        outstanding: dict[RpcId, PendingCall],
        list_ids: set[RpcId],
        hidden: frozenset[str],
        ctx: Ctx,
    ) -> bytes:
        """Read a whole JSON reply, settle the calls it answers, and return what the client
        gets (the same bytes unless a tools/list was filtered)."""
        if (up.content_length or 0) > MAX_METERED_JSON:
            raise UpstreamBroken("upstream JSON reply too large to meter")
        chunks: list[bytes] = []
        size = 0
        async for chunk in up.iter_any():
            size += len(chunk)
            if size > MAX_METERED_JSON:
                raise UpstreamBroken("upstream JSON reply too large to meter")
            chunks.append(chunk)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            doc = orjson.loads(raw)
        except ValueError:
            return raw  # garbage: outstanding calls are refunded by the caller
        messages = doc if isinstance(doc, list) else [doc]
        rewritten = False
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            rpc_id = message.get("id")
            if not isinstance(rpc_id, str | int):
                continue
            call = outstanding.pop(rpc_id, None)
            if call is not None:
                await self._settle(call, message, ctx)
            elif rpc_id in list_ids:
                messages[i] = filter_tools(message, hidden)
                rewritten = True
        if rewritten:
            raw = dumps(messages if isinstance(doc, list) else messages[0])
        return raw

    async def _settle(self, call: PendingCall, message: dict[str, Any], ctx: Ctx) -> None:
        """Settle from the call's final response (cancel-safe: see Settler.final)."""
        try:
            charged, outcome = await self._settler.final(call, message)
        except SpoolError:
            self._m.spool_errors.inc()
            self._call_done(ctx, call.tool, call.decision.cost, "spool_error")
            raise
        if charged:
            self._m.spool_appends.inc()
        self._call_done(ctx, call.tool, call.decision.cost, outcome)

    def _observe_gate(self, ctx: Ctx, gated: GateResult) -> None:
        for tool, decision in gated.decisions:
            self._m.child(self._m.quota_decisions, decision.plan, decision.outcome.value).inc()
            if not decision.allowed:
                self._call_done(ctx, tool, decision.cost, decision.outcome.value)
            elif self._m.per_tenant is not None and decision.used >= 0:
                self._m.per_tenant.labels(ctx.tenant or "-").set(decision.used)
        for tool in gated.hidden:
            self._m.child(self._m.quota_decisions, "-", "hidden_tool").inc()
            self._call_done(ctx, tool, 0, "hidden_tool")

    def _call_done(self, ctx: Ctx, tool: str | None, units: int, outcome: str) -> None:
        """One metric and one log line per gated call: never a key, a secret or a body."""
        self._m.tool_call(tool, outcome)
        log.info(
            "tool_call",
            request_id=ctx.request_id,
            tenant=ctx.tenant,
            tool=tool,
            units=units,
            outcome=outcome,
            upstream_status=ctx.upstream_status,
            duration_ms=round((time.perf_counter() - ctx.started) * 1000, 2),
            upstream_ms=None if ctx.upstream_s is None else round(ctx.upstream_s * 1000, 2),
        )

    async def _refund(self, outstanding: dict[RpcId, PendingCall]) -> None:
        calls = list(outstanding.values())
        outstanding.clear()
        await self._refund_calls(calls)

    async def _refund_calls(self, calls: list[PendingCall], ctx: Ctx | None = None) -> None:
        for call in calls:
            await self._settler.refund(call)
            self._m.tool_call(call.tool, "abandoned")
            log.info(
                "tool_call",
                request_id=call.request_id,
                tenant=call.tenant.id,
                tool=call.tool,
                units=call.decision.cost,
                outcome="abandoned",
                upstream_status=None if ctx is None else ctx.upstream_status,
            )

    async def reap_deferred(self) -> int:
        """Refund deferred calls whose result never arrived; returns how many."""
        calls = self._sessions.expire(self._clock.monotonic())
        await self._refund_calls(calls)
        return len(calls)


async def _read_body(request: web.Request, limit_s: float) -> bytes:
    if request.content.is_eof():
        # It came with the headers (nearly every call): no timer, and no Timeout object,
        # which costs more than the read itself.
        return await request.read()
    async with asyncio.timeout(limit_s):
        return await request.read()


def _valid_session_id(value: str) -> bool:
    # MCP: visible ASCII only (0x21-0x7E). Anything else never reaches Redis or the upstream.
    return 0 < len(value) <= 1024 and value.isascii() and value.isprintable() and " " not in value


def _with(resp: web.Response, headers: dict[str, str]) -> web.Response:
    resp.headers.update(headers)
    return resp


def _too_large(limit: int, cors: dict[str, str]) -> web.Response:
    return rpc_error_reply(
        413,
        PAYLOAD_TOO_LARGE,
        f"Request body too large: the limit is {limit} bytes (proxy.max_body_bytes).",
        headers=cors,
    )
