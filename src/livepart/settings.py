"""The migration's settings: built once from CLI options, validated once, then frozen."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from .errors import InvalidInput

TIME_INTERVALS = ("day", "week", "month")

# Settings that define the migration itself. Changing one of them on resume
# would mix two different migrations, so the hash of these is persisted.
IDENTITY_FIELDS = ("schema", "table", "partition_key", "interval")


@dataclass(frozen=True)
class Settings:
    dsn: str
    schema: str = "public"
    table: str = "LiteLLM_SpendLogs"
    partition_key: str = "startTime"
    interval: str = "month"
    future_partitions: int = 3
    max_partitions: int = 1000
    batch_size: int = 1000
    max_batch_bytes: int = 8 * 1024 * 1024
    sleep: float = 0.0
    verify_batch_size: int = 10000
    lock_timeout: float = 2.0
    retries: int = 20
    swap_attempts: int = 30
    restart: bool = False
    reinstall_trigger: bool = False
    # Test-only: copy without row locks, to prove the stress tests can fail.
    unsafe_no_row_locks: bool = field(default=False)

    def __post_init__(self) -> None:
        if not self.dsn:
            raise InvalidInput("no database given: pass --dsn or set DATABASE_URL")
        if not self.table:
            raise InvalidInput("empty table name: pass --table")
        if not self.partition_key:
            raise InvalidInput("empty partition key: pass --partition-key")
        if self.interval not in TIME_INTERVALS and not _is_positive_int(self.interval):
            raise InvalidInput(
                f"invalid --interval {self.interval!r}: use day, week or month for a time "
                "column, or a positive whole number for an integer column"
            )
        _require_positive("--batch-size", self.batch_size)
        _require_positive("--max-batch-bytes", self.max_batch_bytes)
        _require_positive("--verify-batch-size", self.verify_batch_size)
        _require_positive("--max-partitions", self.max_partitions)
        _require_positive("--retries", self.retries)
        _require_positive("--swap-attempts", self.swap_attempts)
        if self.future_partitions < 0:
            raise InvalidInput("invalid --future-partitions: must be 0 or more")
        if self.sleep < 0:
            raise InvalidInput("invalid --sleep: must be 0 or more seconds")
        if not 0 < self.lock_timeout <= 600:
            raise InvalidInput("invalid --lock-timeout: must be between 0 and 600 seconds")

    @property
    def migration_id(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def integer_interval(self) -> int | None:
        return int(self.interval) if _is_positive_int(self.interval) else None

    @property
    def lock_timeout_ms(self) -> int:
        return max(1, int(self.lock_timeout * 1000))

    def identity(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def identity_hash(self) -> str:
        encoded = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def public_dict(self) -> dict[str, object]:
        """Return the settings without the DSN, which may carry a password."""
        values = asdict(self)
        values.pop("dsn")
        return values


def _is_positive_int(text: str) -> bool:
    return text.isdigit() and int(text) > 0


def _require_positive(option: str, value: float) -> None:
    if value <= 0:
        raise InvalidInput(f"invalid {option}: must be greater than 0")


def default_dsn() -> str:
    return os.environ.get("DATABASE_URL", "")


def unsafe_no_row_locks_from_env() -> bool:
    """Read the test-only switch that turns the backfill's row locks off."""
    return os.environ.get("LIVEPART_TEST_UNSAFE_NO_ROW_LOCKS") == "1"
