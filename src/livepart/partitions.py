"""Partition bounds: computed in UTC with the partition key's own type.

Bounds of a `timestamp` key are wall-clock literals without a zone, and bounds
of a `timestamptz` key carry an explicit `+00`. Neither depends on the session
TimeZone, so no DST change or client setting can move a bound or leave a gap.
Partition names follow the `<table>_pYYYYMMDD` / `<table>_pdefault` pattern
that LiteLLM's own partition manager uses, so it recognises them after the swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from .catalog import INTEGER_TYPES, TIME_TYPES
from .ident import derived_name


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    lower: str  # SQL literal of the inclusive lower bound
    upper: str  # SQL literal of the exclusive upper bound

    def bound_sql(self) -> str:
        return f"FOR VALUES FROM ({self.lower}) TO ({self.upper})"


def default_partition_name(table: str) -> str:
    return derived_name(table, "_pdefault")


def key_kind(type_name: str) -> str | None:
    if type_name in TIME_TYPES:
        return "time"
    if type_name in INTEGER_TYPES:
        return "integer"
    return None


def to_utc_naive(value: datetime | date) -> datetime:
    """Map a key value to a naive UTC datetime, the one scale bounds are computed on."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.astimezone(timezone.utc).replace(tzinfo=None)
        return value
    return datetime(value.year, value.month, value.day)


def floor_time(value: datetime, interval: str) -> datetime:
    start = value.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return start
    if interval == "week":
        return start - timedelta(days=start.weekday())  # ISO weeks start on Monday
    if interval == "month":
        return start.replace(day=1)
    raise ValueError(f"unknown time interval {interval!r}")


def next_time(start: datetime, interval: str) -> datetime:
    if interval == "day":
        return start + timedelta(days=1)
    if interval == "week":
        return start + timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def time_literal(value: datetime, type_name: str) -> str:
    if type_name == "date":
        return f"'{value:%Y-%m-%d}'"
    if type_name == "timestamptz":
        return f"'{value:%Y-%m-%d %H:%M:%S}+00'"
    return f"'{value:%Y-%m-%d %H:%M:%S}'"


def time_partitions(
    table: str, type_name: str, interval: str, first: datetime, last: datetime
) -> list[PartitionSpec]:
    """Return contiguous partitions from the one holding `first` to the one holding `last`."""
    specs = []
    start = floor_time(first, interval)
    while start <= last:
        end = next_time(start, interval)
        specs.append(
            PartitionSpec(
                name=derived_name(table, f"_p{start:%Y%m%d}"),
                lower=time_literal(start, type_name),
                upper=time_literal(end, type_name),
            )
        )
        start = end
    return specs


def integer_partitions(table: str, width: int, first: int, last: int) -> list[PartitionSpec]:
    specs = []
    start = (first // width) * width
    while start <= last:
        label = str(start) if start >= 0 else f"m{-start}"
        specs.append(
            PartitionSpec(
                name=derived_name(table, f"_p{label}"),
                lower=str(start),
                upper=str(start + width),
            )
        )
        start += width
    return specs


def count_time_partitions(interval: str, first: datetime, last: datetime) -> int:
    """Count partitions without building them, to reject absurd spans cheaply."""
    if interval == "month":
        return (last.year - first.year) * 12 + last.month - first.month + 1
    days = (floor_time(last, interval) - floor_time(first, interval)).days
    return days // (7 if interval == "week" else 1) + 1


def planned_partitions(
    *,
    table: str,
    type_name: str,
    interval: str,
    minimum: object,
    maximum: object,
    now: datetime,
    future: int,
) -> tuple[list[PartitionSpec], int]:
    """Return the partitions covering every existing key value plus `future` ahead.

    Also returns how many partitions that is before building them, so the caller
    can reject a span that would need thousands of mostly empty partitions.
    """
    kind = key_kind(type_name)
    if kind == "integer":
        width = int(interval)
        low = minimum if minimum is not None else 0
        high = maximum if maximum is not None else low
        last = high + width * future
        count = (last // width) - (low // width) + 1
        return (integer_partitions(table, width, low, last) if count <= 100_000 else []), count

    low_time = to_utc_naive(minimum) if minimum is not None else now
    high_time = max(to_utc_naive(maximum) if maximum is not None else now, now)
    last = floor_time(high_time, interval)
    for _ in range(future):
        last = next_time(last, interval)
    count = count_time_partitions(interval, low_time, last)
    if count > 100_000:
        return [], count
    return time_partitions(table, type_name, interval, low_time, last), count
