"""Human and JSON renderings of plans and status reports."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from .ddl import Statement
from .plan import Plan
from .state import MigrationState

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}
PARTITIONS_SHOWN = 6


def plan_to_json(plan: Plan, statements: list[Statement], state: MigrationState | None) -> dict[str, Any]:
    table = plan.table
    return {
        "table": f"{table.schema}.{table.name}",
        "server_version": plan.server_version,
        "in_progress_phase": state.phase if state else None,
        "rows_estimated": table.estimated_rows,
        "total_bytes": table.total_bytes,
        "partition_key": {"column": plan.key.name, "type": plan.key.type_sql,
                          "min": plan.minimum, "max": plan.maximum},
        "interval": plan.settings.interval,
        "order_columns": plan.order_columns,
        "primary_key": plan.shadow_primary_key,
        "checks": [{"name": c.name, "status": c.status, "message": c.message} for c in plan.checks],
        "partitions": [{"name": p.name, "from": p.lower, "to": p.upper} for p in plan.partitions],
        "default_partition": plan.names.default_partition,
        "statements": [{"sql": s.sql, "lock": s.lock} for s in statements],
        "ok": not plan.failures,
    }


def print_plan(console: Console, plan: Plan, statements: list[Statement], state: MigrationState | None) -> None:
    table = plan.table
    console.print(f"[bold]{table.schema}.{table.name}[/bold]: about {table.estimated_rows} rows, "
                  f"{table.total_bytes / 1e6:.1f} MB, PostgreSQL {plan.server_version}", soft_wrap=True)
    console.print(f"partition key {plan.key.name} ({plan.key.type_sql}): {plan.minimum} .. {plan.maximum}; "
                  f"new primary key ({', '.join(plan.shadow_primary_key)}); "
                  f"copy order ({', '.join(plan.order_columns)})", soft_wrap=True)
    if state is not None:
        started = state.settings if isinstance(state.settings, dict) else json.loads(state.settings)
        console.print(f"[yellow]a migration of this table is in progress (phase {state.phase}, partition key "
                      f"{started['partition_key']}, interval {started['interval']}); livepart run with those "
                      "settings resumes it[/yellow]", soft_wrap=True)

    checks = RichTable("check", "status", "detail", title="Preflight checks")
    for check in plan.checks:
        style = STATUS_STYLE.get(check.status, "")
        checks.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.message)
    console.print(checks)

    partitions = RichTable("partition", "from", "to", title=f"Partitions ({len(plan.partitions)} + default)")
    shown = plan.partitions
    if len(shown) > PARTITIONS_SHOWN:
        half = PARTITIONS_SHOWN // 2
        shown = shown[:half] + shown[-half:]
    for index, spec in enumerate(shown):
        if len(plan.partitions) > PARTITIONS_SHOWN and index == PARTITIONS_SHOWN // 2:
            partitions.add_row("...", f"{len(plan.partitions) - PARTITIONS_SHOWN} more", "")
        partitions.add_row(spec.name, spec.lower, spec.upper)
    partitions.add_row(plan.names.default_partition, "DEFAULT", "")
    console.print(partitions)

    console.print("[bold]Statements, in order[/bold]")
    for number, statement in enumerate(statements, start=1):
        console.print(f"[dim]-- {number}. lock: {statement.lock}[/dim]", highlight=False, soft_wrap=True)
        console.print(statement.sql.rstrip(";") + ";", highlight=False, markup=False, soft_wrap=True)
    if plan.failures:
        console.print(f"[red]{len(plan.failures)} checks failed: livepart run would stop before any change[/red]")


def print_status(console: Console, report: dict[str, Any]) -> None:
    if report["phase"] is None:
        console.print(f"no migration of {report['migration']} found")
        return
    trigger = report["trigger"]
    if not trigger["expected"]:
        trigger_text = "none (finalized)"
    elif trigger["present"] and trigger["enabled"]:
        trigger_text = "present and enabled"
    else:
        trigger_text = "[red]" + ("missing" if not trigger["present"] else "disabled") + "[/red]"
    eta = report["eta_seconds"]
    rows = [
        ("phase", f"{report['phase']} since {report['phase_since']}"),
        ("rows copied", f"{report['rows_copied']} of about {report['rows_estimated']}"
         + (f" ({report['percent']}%)" if report["percent"] is not None else "")),
        ("rate", f"{report['rows_per_second']} rows/s" if report["rows_per_second"] else "n/a"),
        ("ETA", f"{eta} s" if eta is not None else "n/a"),
        ("checkpoint age", f"{report['checkpoint_age_seconds']} s" if report["checkpoint_age_seconds"] is not None
         else "n/a"),
        ("trigger", trigger_text),
        ("trigger errors", str(report["trigger_errors"])),
        ("throttle", report["throttle"] or "not throttled"),
        ("verify", f"{report['verify']['ranges']} ranges, {report['verify']['differences']} differences, "
                   f"{report['verify']['repaired']} repaired"),
        ("swap lock", f"{report['swap_lock_ms']} ms" if report["swap_lock_ms"] is not None else "n/a"),
        ("worker", f"{report['worker']['host']} pid {report['worker']['pid']}, "
                   f"{'running' if report['worker']['running'] else 'not running'}"),
        ("last error", f"{report['last_error']} ({report['last_error_at']})" if report["last_error"] else "none"),
    ]
    table = RichTable(show_header=False, title=f"livepart status: {report['migration']}")
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
