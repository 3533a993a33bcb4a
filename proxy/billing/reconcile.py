"""`reconcile`: what this replica's spool says Stripe accepted, against Stripe's own meter
event summaries, per customer and meter, for one period."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import stripe

from ..usage.spool import Spool


@dataclass(frozen=True, slots=True)
class Drift:
    customer: str
    event_name: str
    local: int
    stripe: int

    @property
    def drift(self) -> int:
        return self.stripe - self.local


def month_bounds(period: str) -> tuple[int, int]:
    """'YYYY-MM' -> [start, end) epoch seconds, UTC. Raises ValueError with the fix."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"--period {period!r}: expected YYYY-MM, e.g. 2026-11") from None
    end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return int(start.timestamp()), int(end.timestamp())


async def reconcile(client: stripe.StripeClient, spool: Spool, start: int, end: int) -> list[Drift]:
    local = await spool.reported_totals(start, end)
    meters: dict[str, str] = {}
    listing = await client.v1.billing.meters.list_async({"limit": 100})
    async for meter in listing.auto_paging_iter():
        meters[meter.event_name] = meter.id
    rows = []
    for (customer, event_name), local_total in sorted(local.items()):
        meter_id = meters.get(event_name)
        remote = 0
        if meter_id is not None:
            summaries = await client.v1.billing.meters.event_summaries.list_async(
                meter_id, {"customer": customer, "start_time": start, "end_time": end}
            )
            async for summary in summaries.auto_paging_iter():
                remote += int(summary.aggregated_value)
        rows.append(Drift(customer, event_name, local_total, remote))
    return rows


def worst_drift(rows: list[Drift], *, shared: bool) -> int:
    """The largest drift that counts (pure). With `shared`, Stripe's totals also hold other
    replicas' usage, so only Stripe falling short of this spool is a loss."""
    return max(((-r.drift if shared else abs(r.drift)) for r in rows), default=0)


def render(rows: list[Drift]) -> str:
    if not rows:
        return "nothing reported in this period"
    head = f"{'customer':24} {'meter':24} {'local':>10} {'stripe':>10} {'drift':>8}"
    lines = [head] + [
        f"{r.customer:24} {r.event_name:24} {r.local:>10} {r.stripe:>10} {r.drift:>+8}"
        for r in rows
    ]
    return "\n".join(lines)
