"""``pgtasks doctor``: the queue tables' live and dead rows and sizes, what holds back vacuum,
and advice (`pgtasks.admin.doctor`). Exit status 0 when there is no advice, 2 when there is
some, so that a script or a cron job can alert on it."""

from __future__ import annotations

import argparse

from ..admin import doctor as admin_doctor
from ..app import App
from .output import one_line, print_json
from .status import age, columns


async def doctor(app: App, args: argparse.Namespace) -> int:
    report = await admin_doctor.doctor(app.database, horizon_seconds=args.horizon_age)
    if args.json:
        print_json(report.to_json())
    else:
        print("\n".join(render(report)))
    return 2 if report.advice else 0


def render(report: admin_doctor.Report) -> list[str]:
    rows = [
        (
            t.table,
            f"{t.live:,}",
            f"{t.dead:,}",
            f"{t.bytes / 1024:,.0f} kB",
            t.vacuumed_at.isoformat(timespec="seconds") if t.vacuumed_at else "never",
        )
        for t in report.tables
    ]
    lines = ["tables:", *columns(("table", "live", "dead", "size", "last vacuum"), rows)]
    lines.append("")
    if report.holders:
        lines.append("holding the xmin horizon (oldest first):")
        lines += [
            f"- {h.kind} {one_line(h.name, 64)}"
            + (f", for {age(h.seconds)}" if h.seconds is not None else "")
            + f", {h.xid_age:,} transactions behind: {one_line(h.detail, 120)}"
            for h in report.holders
        ]
    else:
        lines.append("holding the xmin horizon: no other session")
    lines.append("")
    if report.advice:
        lines += ["advice:", *(f"- {one_line(a, 400)}" for a in report.advice)]
    else:
        lines.append("advice: none, all is well")
    return lines
