"""livepart: convert a large, live PostgreSQL table into a range-partitioned one."""

__version__ = "0.1.0"
