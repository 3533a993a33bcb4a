"""The `mcp-quota-proxy` command: parse arguments, load config, call into the package."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, default_config_path, load_config
from .keys import KeySpace
from .store import STORE_ERRORS, connect
from .tenants import TenantError, TenantStore
from .usage.spool import SpoolError

if TYPE_CHECKING:  # serve imports the whole app: only `serve` and `demo` load it
    from .serve import ListenError

EXIT_USAGE = 2


class CliError(Exception):
    """A failure the user can fix; printed without a traceback."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _admin_store(config: Config) -> TenantStore:
    if config.redis.embedded:
        raise CliError(
            "tenant and key commands need the shared Redis the proxy uses: set REDIS_URL "
            "(or redis.url in config.yaml). memory:// lives inside one serve process."
        )
    stores = connect(config.redis)
    return TenantStore(
        stores.main, KeySpace(config.redis.key_prefix), config.auth.pepper, config.auth.key_prefix
    )


async def _with_store(config: Config, work: Callable[[TenantStore], Awaitable[None]]) -> None:
    store = _admin_store(config)
    try:
        await work(store)
    except STORE_ERRORS as exc:
        raise CliError(
            f"cannot reach Redis ({type(exc).__name__}: {exc}). Check REDIS_URL and that Redis "
            "is running."
        ) from None
    finally:
        with contextlib.suppress(*STORE_ERRORS):
            await store.close()


def _listen_error(error: ListenError, *, port_option: str) -> CliError:
    """One line for a listening socket that cannot be bound; `port_option` is how the user
    picks another port (listen.port, --port N)."""
    exc, host, port = error.cause, error.host, error.port
    # asyncio's strerror repeats the address ("error while attempting to bind on ...").
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or exc
    if exc.errno == errno.EADDRINUSE:
        hint = f"; is another process using it? Pick another {port_option}"
    elif exc.errno == errno.EACCES:
        hint = f"; ports below 1024 need privileges: pick another {port_option}"
    elif isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        hint = "; listen.host must be a name or address of this machine"
    else:
        hint = ""
    return CliError(f"cannot listen on {host}:{port}: {reason}{hint}")


def _spool_error(path: str, exc: SpoolError) -> CliError:
    cause = exc.__cause__
    if cause is None:  # the spool's own finding (e.g. a newer schema), with its advice
        return CliError(f"spool.path {path}: {exc}")
    reason = str(cause)
    if isinstance(cause, OSError):
        blocker = next((p for p in reversed(Path(path).parents) if p.is_file()), None)
        if blocker is not None:  # mkdir's "File exists" would not say which file is in the way
            reason = f"{blocker} is a file, not a directory"
        else:
            reason = cause.strerror or reason
            if cause.filename is not None and str(cause.filename) != path:
                reason = f"{reason} ({cause.filename})"
    return CliError(
        f"spool.path {path}: {reason}; fix or move the file, or point spool.path elsewhere"
    )


@contextlib.contextmanager
def _spool_errors(config: Config) -> Iterator[None]:
    """A spool that cannot be opened is the operator's to fix: one line, no traceback."""
    try:
        yield
    except SpoolError as exc:
        raise _spool_error(config.spool.path, exc) from None


def _when(ts: int | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- verbs ---------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    where = args.config or "embedded defaults"
    print(f"{where}: OK")
    print(f"  listen   {config.listen.host}:{config.listen.port}")
    print(f"  upstream {config.upstream.url} paths {', '.join(config.upstream.mcp_paths)}")
    store = (
        "embedded (memory://)"
        if config.redis.embedded
        else "Redis Cluster"
        if config.redis.cluster
        else "shared Redis"
    )
    print(f"  store    {store}, fail_mode {config.redis.fail_mode}")
    print(f"  plans    {', '.join(config.plans)} (default {config.default_plan})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import configure
    from .serve import ListenError, run_server

    config = _config(args)
    configure(config.log_level)
    try:
        with _spool_errors(config):
            _run(run_server(config, config_path=args.config))
    except ListenError as exc:
        raise _listen_error(exc, port_option="listen.port") from None
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from .logs import configure
    from .usage.runner import drain

    config = _config(args)
    configure(config.log_level)
    if not config.billing.enabled:
        raise CliError(
            "billing.enabled is false: there is nothing to send. Enable it in config.yaml and "
            "set STRIPE_SECRET_KEY."
        )
    with _spool_errors(config):
        report = asyncio.run(drain(config, once=args.once))
    if report is not None:
        print(
            f"claimed {report.claimed_batches} batches; sent {report.sent}, duplicates "
            f"{report.duplicates}, rejected {report.rejected}, to retry {report.retries}; "
            f"{report.finished_batches} batches reported"
        )
        return 1 if report.retries or report.rejected else 0
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (it is a dependency on Linux), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _stripe_config(args: argparse.Namespace) -> Config:
    config = _config(args)
    if not config.billing.stripe_secret_key:
        raise CliError("set STRIPE_SECRET_KEY (and STRIPE_API_BASE for a test double)")
    return config


def cmd_billing(args: argparse.Namespace) -> int:
    from decimal import Decimal, InvalidOperation

    from .billing.setup import PriceSpec, config_block, setup_billing
    from .billing.stripe_client import make_client

    config = _stripe_config(args)
    try:
        spec = PriceSpec(
            currency=args.currency.lower(),
            pro_plan=args.pro_plan,
            pro_base_cents=args.pro_base_cents,
            overage_cents_per_unit=Decimal(args.overage_cents),
            graduated=not args.flat,
        )
    except InvalidOperation:
        raise CliError(f"--overage-cents {args.overage_cents!r}: expected a number") from None

    async def run() -> str:
        client, http = make_client(config.billing, retries=2)
        try:
            result = await setup_billing(client, config, spec)
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
        created = "\n".join(f"  created {c}" for c in result.created) or "  nothing created"
        return f"{created}\n\nPaste into config.yaml:\n\n{config_block(config, result)}"

    print(_run_stripe(run))
    return 0


def _run_stripe(work: Callable[[], Coroutine[Any, Any, str]]) -> str:
    import stripe

    try:
        return asyncio.run(work())
    except stripe.AuthenticationError:
        raise CliError("Stripe refused the API key: check STRIPE_SECRET_KEY") from None
    except stripe.StripeError as exc:
        raise CliError(f"Stripe: {exc.user_message or exc}") from None


def _period(period: str | None) -> tuple[int, int]:
    """[start, end) of a YYYY-MM month, or of this month (UTC) when none is given."""
    from .billing.reconcile import month_bounds
    from .quota.policy import calendar_month

    if period:
        try:
            return month_bounds(period)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    month = calendar_month(time.time())
    return month.start, month.end


def cmd_usage(args: argparse.Namespace) -> int:
    from .quota.policy import iso
    from .usage.runner import open_spool

    config = _config(args)
    start, end = _period(args.period)

    async def run() -> None:
        spool = open_spool(config)
        await spool.open()
        try:
            u = await spool.tenant_usage(args.tenant_id, start, end)
        finally:
            await spool.close()
        print(
            f"tenant {args.tenant_id}, {iso(start)} .. {iso(end)} (this replica's spool "
            f"{config.spool.path})"
        )
        print(f"  units used   {u.units}")
        print(f"  reported     {u.reported}   (accepted by Stripe)")
        print(f"  pending      {u.pending}   (waiting for the drainer)")
        print(f"  not billed   {u.unbillable}   (no Stripe customer, or an unbilled plan)")
        if u.tokens:
            print(f"  tokens       {u.tokens}")

    with _spool_errors(config):
        asyncio.run(run())
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .billing.reconcile import reconcile, render, worst_drift
    from .billing.stripe_client import make_client
    from .usage.runner import open_spool

    config = _stripe_config(args)
    start, end = _period(args.period)
    worst = 0

    async def run() -> str:
        nonlocal worst
        spool = open_spool(config)
        await spool.open()
        client, http = make_client(config.billing, retries=2)
        try:
            rows = await reconcile(client, spool, start, end)
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
            await spool.close()
        worst = worst_drift(rows, shared=args.shared)
        return render(rows)

    with _spool_errors(config):
        print(_run_stripe(run))
    if worst > args.tolerance:
        print(f"drift {worst} is above the tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo
    from .serve import ListenError

    try:
        return run_demo(port=args.port)
    except ListenError as exc:
        raise _listen_error(exc, port_option="port with --port N") from None


def cmd_tenant(args: argparse.Namespace) -> int:
    config = _config(args)

    async def work(store: TenantStore) -> None:
        if args.action == "create":
            _check_plan(config, args.plan)
            t = await store.create(
                args.tenant_id,
                name=args.name,
                plan=args.plan or config.default_plan,
                stripe_customer=args.stripe_customer,
                now=int(time.time()),
            )
            print(f"created tenant {t.id} on plan {t.plan}")
            print(f"next: mcp-quota-proxy key issue {t.id}")
        elif args.action == "show":
            t = await store.require(args.tenant_id)
            for field, value in (
                ("id", t.id),
                ("name", t.name),
                ("plan", t.plan),
                ("status", t.status),
                ("stripe_customer", t.stripe_customer or "-"),
                ("period_start", _when(t.period_start)),
                ("period_end", _when(t.period_end)),
                ("created_at", _when(t.created_at)),
            ):
                print(f"{field:16} {value}")
        elif args.action == "list":
            tenants = await store.all()
            if not tenants:
                print("no tenants; create one with: mcp-quota-proxy tenant create ID")
            for t in tenants:
                print(f"{t.id:24} {t.plan:12} {t.status:10} {t.stripe_customer or '-'}")
        elif args.action == "set-plan":
            _check_plan(config, args.plan)
            t = await store.update(args.tenant_id, plan=args.plan)
            print(f"tenant {t.id} is now on plan {t.plan}")

    asyncio.run(_with_store(config, work))
    return 0


def _check_plan(config: Config, plan: str | None) -> None:
    if plan is not None and plan not in config.plans:
        raise CliError(f"unknown plan {plan!r}; plans in the config are {', '.join(config.plans)}")


def cmd_key(args: argparse.Namespace) -> int:
    config = _config(args)

    async def work(store: TenantStore) -> None:
        if args.action == "issue":
            key, info = await store.issue_key(
                args.tenant_id, label=args.label, now=int(time.time())
            )
            print(key)
            print(
                f"key {info.key_id} issued for tenant {args.tenant_id}. It is shown only once: "
                "store it now. Clients send it as 'Authorization: Bearer <key>'.",
                file=sys.stderr,
            )
        elif args.action == "list":
            keys = await store.list_keys(args.tenant_id)
            if not keys:
                print(
                    f"tenant {args.tenant_id} has no keys; issue one with: "
                    f"mcp-quota-proxy key issue {args.tenant_id}"
                )
            for k in keys:
                print(f"{k.key_id}  {_when(k.created_at)}  {k.label}")
        elif args.action == "revoke":
            await store.revoke_key(args.tenant_id, args.key_id)
            print(f"revoked key {args.key_id} of tenant {args.tenant_id}")

    asyncio.run(_with_store(config, work))
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-quota-proxy",
        description="A sidecar that puts API keys, quotas and Stripe billing in front of an "
        "unmodified MCP server.",
    )
    config_help = (
        "config file (default: $MQP_CONFIG, else ./config.yaml if present, else built-in defaults)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=default_config_path(), help=config_help)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("serve", parents=[common], help="run the proxy")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("drain", parents=[common], help="send spooled usage to Stripe")
    p.add_argument(
        "--once",
        action="store_true",
        help="one cycle, then exit (non-zero if anything is left to retry or was rejected)",
    )
    p.set_defaults(func=cmd_drain)

    billing = verbs.add_parser("billing", help="Stripe set-up")
    bv = billing.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = bv.add_parser(
        "setup",
        parents=[common],
        help="create or find the meters, product and prices (idempotent); print the config",
    )
    p.add_argument("--currency", default="usd")
    p.add_argument("--pro-plan", default="pro", help="the plan the paid prices belong to")
    p.add_argument("--pro-base-cents", type=int, default=2900, help="monthly base price")
    p.add_argument("--overage-cents", default="0.5", help="price per unit after the included ones")
    p.add_argument(
        "--flat", action="store_true", help="bill every unit (no free tier for included units)"
    )
    p.set_defaults(func=cmd_billing)

    p = verbs.add_parser("usage", parents=[common], help="a tenant's usage in this replica's spool")
    p.add_argument("tenant_id")
    p.add_argument("--period", help="YYYY-MM (default: this month, UTC)")
    p.set_defaults(func=cmd_usage)

    p = verbs.add_parser(
        "reconcile", parents=[common], help="compare reported usage with Stripe's meter summaries"
    )
    p.add_argument("--period", help="YYYY-MM (default: this month, UTC)")
    p.add_argument("--tolerance", type=int, default=0, help="allowed drift in units (default 0)")
    p.add_argument(
        "--shared",
        action="store_true",
        help="other replicas report to the same customers: only Stripe falling short of this "
        "spool is drift (Stripe also holds their usage)",
    )
    p.set_defaults(func=cmd_reconcile)

    p = verbs.add_parser(
        "check-config", parents=[common], help="validate the configuration and exit"
    )
    p.set_defaults(func=cmd_check_config)

    p = verbs.add_parser("demo", help="run a demo: bundled MCP server + proxy on embedded defaults")
    p.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    p.set_defaults(func=cmd_demo)

    tenant = verbs.add_parser("tenant", help="create, show, list tenants; change a tenant's plan")
    tv = tenant.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = tv.add_parser("create", parents=[common], help="create a tenant")
    p.add_argument("tenant_id", help="lowercase id, e.g. acme")
    p.add_argument("--name", help="display name")
    p.add_argument("--plan", help="plan name from the config (default: default_plan)")
    p.add_argument("--stripe-customer", help="Stripe customer id (cus_...) for billing")
    p = tv.add_parser("show", parents=[common], help="show one tenant")
    p.add_argument("tenant_id")
    tv.add_parser("list", parents=[common], help="list tenants")
    p = tv.add_parser("set-plan", parents=[common], help="move a tenant to another plan")
    p.add_argument("tenant_id")
    p.add_argument("plan")
    tenant.set_defaults(func=cmd_tenant)

    key = verbs.add_parser("key", help="issue, list, revoke a tenant's API keys")
    kv = key.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = kv.add_parser("issue", parents=[common], help="issue a key (printed once)")
    p.add_argument("tenant_id")
    p.add_argument("--label", default="", help="a note to recognise the key by")
    p = kv.add_parser("list", parents=[common], help="list a tenant's key ids")
    p.add_argument("tenant_id")
    p = kv.add_parser("revoke", parents=[common], help="revoke a key (effective on every replica)")
    p.add_argument("tenant_id")
    p.add_argument("key_id", help="the id shown by `key list`")
    key.set_defaults(func=cmd_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except (ConfigError, TenantError, CliError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
