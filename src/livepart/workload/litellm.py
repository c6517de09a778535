"""The LiteLLM proxy's "LiteLLM_SpendLogs" table: schema, row generator and bulk load.

The demo, the tests and the benchmarks use this module to build the table that a
long-lived LiteLLM install has, and to fill it with rows shaped like the proxy's.

Facts about the real table that the code below relies on:

* Columns were appended by migrations over time, so their physical order
  (LEGACY_COLUMN_ORDER) differs from the Prisma model order (MODEL_COLUMNS) in
  which the proxy names them. Nothing here relies on column positions.
* "startTime", "endTime" and "completionStartTime" are timestamp(3) without time
  zone and contain UTC wall-clock values.
* Rows are large because of the JSONB columns metadata, messages, response and
  proxy_server_request: about 4.5 KB a row on average in one public report, and
  single rows of about 2 MB have been reported.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from importlib import resources
from itertools import accumulate, islice
from typing import Any, TypeVar

import asyncpg

from livepart.ident import quote_ident

TABLE = "LiteLLM_SpendLogs"
KEY_COLUMN = "request_id"
TIME_COLUMN = "startTime"

# The order in which the proxy names the columns in its INSERT statements.
MODEL_COLUMNS: tuple[str, ...] = (
    "request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens",
    "completion_tokens", "startTime", "endTime", "completionStartTime", "model",
    "model_id", "model_group", "custom_llm_provider", "api_base", "user", "metadata",
    "cache_hit", "cache_key", "request_tags", "team_id", "organization_id", "end_user",
    "requester_ip_address", "messages", "response", "session_id", "status",
    "mcp_namespaced_tool_name", "agent_id", "proxy_server_request",
    "request_duration_ms", "litellm_call_id",
)

# The physical column order that legacy_spendlogs.sql creates.
LEGACY_COLUMN_ORDER: tuple[str, ...] = (
    "request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens",
    "completion_tokens", "startTime", "endTime", "completionStartTime", "model",
    "model_id", "model_group", "custom_llm_provider", "api_base", "user", "metadata",
    "cache_hit", "cache_key", "request_tags", "team_id", "end_user",
    "requester_ip_address", "messages", "response", "proxy_server_request",
    "session_id", "status", "mcp_namespaced_tool_name", "organization_id", "agent_id",
    "request_duration_ms", "litellm_call_id",
)

# SQL type of each column, for casts in statements that pass columns as arrays.
COLUMN_TYPES: dict[str, str] = {
    "request_id": "text", "call_type": "text", "api_key": "text",
    "spend": "double precision", "total_tokens": "integer", "prompt_tokens": "integer",
    "completion_tokens": "integer", "startTime": "timestamp(3)", "endTime": "timestamp(3)",
    "completionStartTime": "timestamp(3)", "model": "text", "model_id": "text",
    "model_group": "text", "custom_llm_provider": "text", "api_base": "text", "user": "text",
    "metadata": "jsonb", "cache_hit": "text", "cache_key": "text", "request_tags": "jsonb",
    "team_id": "text", "organization_id": "text", "end_user": "text",
    "requester_ip_address": "text", "messages": "jsonb", "response": "jsonb",
    "session_id": "text", "status": "text", "mcp_namespaced_tool_name": "text",
    "agent_id": "text", "proxy_server_request": "jsonb", "request_duration_ms": "integer",
    "litellm_call_id": "text",
}

JSON_COLUMNS: frozenset[str] = frozenset(
    name for name, sql_type in COLUMN_TYPES.items() if sql_type == "jsonb"
)

VIEW_NAMES: tuple[str, ...] = (
    "MonthlyGlobalSpend",
    "Last30dKeysBySpend",
    "Last30dModelsBySpend",
    "MonthlyGlobalSpendPerKey",
    "MonthlyGlobalSpendPerUserPerKey",
    "DailyTagSpend",
    "Last30dTopEndUsersSpend",
)

INDEX_NAMES: tuple[str, ...] = (
    "LiteLLM_SpendLogs_pkey",
    "LiteLLM_SpendLogs_startTime_idx",
    "LiteLLM_SpendLogs_end_user_idx",
    "LiteLLM_SpendLogs_session_id_idx",
    "LiteLLM_SpendLogs_startTime_request_id_idx",
    "LiteLLM_SpendLogs_api_key_startTime_spend_idx",
    "LiteLLM_SpendLogs_litellm_call_id_idx",
)

SCHEMA_FILE = "legacy_spendlogs.sql"

T = TypeVar("T")


async def create_legacy_schema(conn: asyncpg.Connection, schema: str = "public") -> None:
    """Create the legacy table, its indexes and the seven views in `schema`.

    The schema is created if it is missing. search_path is set with SET LOCAL
    inside a transaction, so it goes back to its old value when this returns
    (or, if the caller already has a transaction open, when that one ends).
    """
    sql = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
        await conn.execute(sql)


def encode_json(value: Any) -> str | None:
    """Serialize a JSON column value to text, the form asyncpg's default jsonb codec expects."""
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_record(row: dict[str, Any], columns: Iterable[str] = MODEL_COLUMNS) -> tuple[Any, ...]:
    """Return the values of `row` for `columns`, with JSON columns serialized to text."""
    return tuple(
        encode_json(row[name]) if name in JSON_COLUMNS else row[name] for name in columns
    )


def json_size(row: dict[str, Any]) -> int:
    """Return the UTF-8 size in bytes of the row's JSON columns, serialized without spaces."""
    return sum(
        len(encoded.encode("utf-8"))
        for encoded in (encode_json(row[name]) for name in JSON_COLUMNS)
        if encoded is not None
    )


async def load_rows(
    conn: asyncpg.Connection,
    rows: Iterable[dict[str, Any]],
    table: str = TABLE,
    schema: str = "public",
    control: str | None = None,
    *,
    chunk_rows: int = 2000,
) -> int:
    """Copy generated rows into `table` (and into `control` if given) and return the row count.

    Rows go in with COPY, naming the columns, in chunks of `chunk_rows`. Each
    chunk is one transaction that writes the table and the control table, so
    the two contain the same rows after every commit. `rows` may be a lazy
    iterator: only one chunk is in memory at a time.

    JSON values are sent as text, so `conn` must use asyncpg's default jsonb
    codec. A connection with a custom jsonb codec would encode them twice.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    columns = list(MODEL_COLUMNS)
    iterator = iter(rows)
    loaded = 0
    while chunk := list(islice(iterator, chunk_rows)):
        records = [to_record(row, columns) for row in chunk]
        async with conn.transaction():
            await conn.copy_records_to_table(
                table, records=records, columns=columns, schema_name=schema
            )
            if control is not None:
                await conn.copy_records_to_table(
                    control, records=records, columns=columns, schema_name=schema
                )
        loaded += len(records)
    return loaded


# ---------------------------------------------------------------------------
# Row generator

# Vocabulary for message text: mostly English, with accented Latin words, CJK
# words, Hangul, a right-to-left word and characters outside the Basic
# Multilingual Plane, so that encoding bugs show up in comparisons.
_WORDS = (
    "the of and to in is that for it with as on be at by this from or have an "
    "request response model token latency cache partition index table query "
    "customer invoice order shipment summary report error retry timeout budget "
    "please explain write translate summarize list compare analyze draft review "
    "function return value string number array object schema database server "
    "python javascript rust kubernetes docker cluster deployment pipeline "
    "monday january morning weather travel hotel flight meeting agenda notes "
    "café naïve résumé façade déjà Zürich São Paulo jalapeño crème brûlée "
    "Ångström Straße über español français Ærøskøbing Kraków Ñandú "
    "数据库 分区 迁移 查询 東京 日本語 検索 表 行 列 性能 "
    "한국어 데이터 모델 "
    "שלום "
    "🙂 🚀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
).split()

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a customer support agent for an online shop. Answer briefly and politely, "
    "and never promise refunds without an order number.",
    "You are a senior software engineer. Review the code the user sends, point out bugs "
    "first, then style issues, and suggest concrete fixes with short code examples.",
    "Tu es un assistant qui répond en français, de façon concise et précise.",
    "あなたは親切なアシスタントです。簡潔に日本語で答えてください。",
    "You translate product descriptions between English, German and Spanish. Keep the "
    "formatting, units and brand names unchanged, and do not add marketing claims.",
)

# (model, provider, api_base, call_type, price per prompt token, price per
# completion token, weight). The api_base values are placeholders on example hosts.
_MODELS = (
    ("gpt-4o", "openai", "https://api.openai.example/v1", "acompletion", 2.5e-6, 1.0e-5, 30),
    ("gpt-4o-mini", "openai", "https://api.openai.example/v1", "acompletion", 1.5e-7, 6.0e-7, 30),
    ("claude-3-5-sonnet-20241022", "anthropic", "https://api.anthropic.example", "acompletion", 3.0e-6, 1.5e-5, 15),
    ("gpt-4-turbo", "azure", "https://contoso-eastus.openai.azure.example", "acompletion", 1.0e-5, 3.0e-5, 8),
    ("anthropic.claude-3-haiku-20240307-v1:0", "bedrock", "https://bedrock-runtime.us-east-1.example", "acompletion", 2.5e-7, 1.25e-6, 6),
    ("gemini-1.5-pro", "vertex_ai", "https://us-central1-aiplatform.example", "acompletion", 1.25e-6, 5.0e-6, 5),
    ("text-embedding-3-small", "openai", "https://api.openai.example/v1", "aembedding", 2.0e-8, 0.0, 5),
    ("gpt-3.5-turbo-instruct", "openai", "https://api.openai.example/v1", "atext_completion", 1.5e-6, 2.0e-6, 1),
)
_MODEL_CUM_WEIGHTS = tuple(accumulate(model[-1] for model in _MODELS))
_CHAT_MODELS = tuple(i for i, model in enumerate(_MODELS) if model[3] == "acompletion")

_TAGS = (
    "prod", "staging", "dev", "team:search", "team:support", "feature:summarize",
    "feature:chat", "feature:translate", "batch", "experiment:b", "客户端", "café-bot",
)

_FINISH_REASONS = ("stop", "stop", "stop", "stop", "length", "tool_calls")

# Bit masks that turn 128 random bits into a version 4, RFC 4122 variant UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)

# Size of the random-word text that message contents are cut from. Each
# generator builds its own corpus from its seed.
_CORPUS_CHARS = 256 * 1024

# Message and response text lengths, in characters, follow log-normal
# distributions with these medians, truncated at _MAX_TEXT_CHARS. Together with
# the metadata the JSON of an ordinary row averages about 3.8 KB, and the large
# rows add about 0.6 KB a row on average (see the measurement in RowGenerator).
_PROMPT_MEDIAN_CHARS = 450
_ANSWER_MEDIAN_CHARS = 450
_TEXT_SIGMA = 1.0
_MAX_TEXT_CHARS = 24_000


def _ceil_to_millisecond(moment: datetime) -> datetime:
    """Return `moment` as a naive UTC datetime rounded up to a whole millisecond."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    remainder = moment.microsecond % 1000
    if remainder:
        moment += timedelta(microseconds=1000 - remainder)
    return moment


class RowGenerator:
    """Deterministic generator of "LiteLLM_SpendLogs" rows shaped like the proxy's.

    Each row is a dict keyed by column name with a value for every column in
    MODEL_COLUMNS. JSON columns contain Python objects (dicts and lists). Two
    generators with the same seed, time range and options return the same rows
    for the same sequence of calls.

    Timestamps are naive datetimes containing UTC wall-clock values, rounded to
    whole milliseconds, so they compare equal after a round trip through
    timestamp(3). "startTime" lies in [start, end). Aware datetimes passed as
    `start` and `end` are converted to naive UTC, and `start` is rounded up to a
    whole millisecond.

    The JSON columns together average about 4 KB a row. One row in every block of
    round(1 / large_row_fraction) rows (at a random place in the block) is large:
    its messages carry a base64 image or a long document, for a JSON size drawn
    uniformly from [large_row_min_bytes, large_row_max_bytes]. A large_row_fraction
    of 0 turns large rows off.

    Speed: rows(50_000) took 6.4 s on an idle 2-core AMD EPYC virtual machine
    with Python 3.11.7 (about 7,800 rows a second), and up to 8.8 s while other
    processes shared the cores, measured with `python -m livepart.workload.litellm`.
    Those rows averaged 4,393 bytes of compact JSON, and PostgreSQL's jsonb text
    output is about 5% longer because it adds spaces.
    """

    def __init__(
        self,
        seed: int,
        start: datetime,
        end: datetime,
        *,
        large_row_fraction: float = 0.001,
        large_row_min_bytes: int = 200_000,
        large_row_max_bytes: int = 1_000_000,
    ) -> None:
        self.start = _ceil_to_millisecond(start)
        end = end.astimezone(timezone.utc).replace(tzinfo=None) if end.tzinfo else end
        self._span_ms = math.ceil((end - self.start) / timedelta(milliseconds=1))
        if self._span_ms <= 0:
            raise ValueError(f"start must be before end, got start={start} end={end}")
        self.end = end
        if not 0 <= large_row_fraction <= 1:
            raise ValueError(f"large_row_fraction must be in [0, 1], got {large_row_fraction}")
        if not 0 < large_row_min_bytes <= large_row_max_bytes:
            raise ValueError(
                "large row sizes must satisfy 0 < large_row_min_bytes <= large_row_max_bytes, "
                f"got {large_row_min_bytes} and {large_row_max_bytes}"
            )
        self.large_row_min_bytes = large_row_min_bytes
        self.large_row_max_bytes = large_row_max_bytes
        self._large_row_period = round(1 / large_row_fraction) if large_row_fraction else 0

        self._rng = random.Random(seed)
        self._rows_made = 0
        self._next_large_row = self._pick_large_row(0)
        self._make_pools()

    def _make_pools(self) -> None:
        """Draw the corpus and the id pools (keys, users, teams) that rows pick from."""
        rng = self._rng
        words: list[str] = []
        length = 0
        while length < _CORPUS_CHARS:
            batch = rng.choices(_WORDS, k=4096)
            words.extend(batch)
            length += sum(len(word) + 1 for word in batch)
        self._corpus = " ".join(words)[:_CORPUS_CHARS]
        self._api_keys = [f"{rng.getrandbits(256):064x}" for _ in range(40)]
        self._key_aliases = [f"key-{rng.choice(_TAGS).split(':')[-1]}-{i}" for i in range(40)]
        self._teams = [self._uuid() for _ in range(8)]
        self._orgs = [self._uuid() for _ in range(3)]
        self._users = [f"user-{rng.randrange(10**6):06d}" for _ in range(60)]
        self._end_users = [f"customer-{rng.randrange(10**8):08d}" for _ in range(300)]
        self._model_ids = [f"{rng.getrandbits(128):032x}" for _ in _MODELS]
        self._ips = [f"{net}.{rng.randrange(1, 255)}" for net in ("192.0.2", "198.51.100", "203.0.113") for _ in range(10)]

    def _pick_large_row(self, block_start: int) -> int:
        if not self._large_row_period:
            return -1
        return block_start + self._rng.randrange(self._large_row_period)

    def _uuid(self) -> str:
        """Return a random version 4 UUID in its 36-character text form."""
        bits = self._rng.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET
        digits = f"{bits:032x}"
        return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"

    def _pick(self, options: Sequence[T]) -> T:
        """Return a random element, like random.choice but faster on this hot path."""
        return options[int(self._rng.random() * len(options))]

    def _text(self, median_chars: int) -> str:
        """Cut a text of log-normal length from the corpus at a random place."""
        rng = self._rng
        length = min(int(rng.lognormvariate(math.log(median_chars), _TEXT_SIGMA)) + 1, _MAX_TEXT_CHARS)
        offset = rng.randrange(_CORPUS_CHARS - length)
        return self._corpus[offset:offset + length]

    # -- public API ---------------------------------------------------------

    def rows(self, count: int) -> list[dict[str, Any]]:
        """Return `count` rows whose "startTime" values rise across [start, end).

        Row i starts at a random moment in the i-th of `count` equal slices of the
        range, like a table that the proxy filled in time order.
        """
        return list(self.iter_rows(count))

    def iter_rows(self, count: int) -> Iterator[dict[str, Any]]:
        """Yield the rows of rows(count) one at a time, for loads larger than memory."""
        slice_ms = self._span_ms / count if count else 0
        for i in range(count):
            offset_ms = min(int((i + self._rng.random()) * slice_ms), self._span_ms - 1)
            yield self.row(self.start + timedelta(milliseconds=offset_ms))

    def row(self, start_time: datetime | None = None) -> dict[str, Any]:
        """Return one row starting at `start_time`, or at a random moment in [start, end).

        A given `start_time` is rounded up to a whole millisecond and may lie outside
        [start, end).
        """
        rng = self._rng
        if start_time is None:
            start_time = self.start + timedelta(milliseconds=rng.randrange(self._span_ms))
        else:
            start_time = _ceil_to_millisecond(start_time)

        large = self._rows_made == self._next_large_row
        self._rows_made += 1
        if self._large_row_period and self._rows_made % self._large_row_period == 0:
            self._next_large_row = self._pick_large_row(self._rows_made)

        return self._make_row(start_time, large)

    # -- row assembly -------------------------------------------------------

    def _make_row(self, start_time: datetime, large: bool) -> dict[str, Any]:
        rng = self._rng
        if large:
            # Only chat requests carry a large message in this generator.
            model_index = self._pick(_CHAT_MODELS)
        else:
            model_index = bisect.bisect(_MODEL_CUM_WEIGHTS, rng.random() * _MODEL_CUM_WEIGHTS[-1])
        model, provider, api_base, call_type, prompt_price, completion_price, _ = _MODELS[model_index]
        failed = rng.random() < 0.02
        streamed = call_type == "acompletion" and rng.random() < 0.6
        duration_ms = int(rng.lognormvariate(math.log(1800), 0.9)) + 20
        end_time = start_time + timedelta(milliseconds=duration_ms)
        if failed:
            completion_start = None
        elif streamed:
            # Time to first token: a share of the whole request duration.
            completion_start = start_time + timedelta(milliseconds=int(duration_ms * rng.uniform(0.05, 0.6)))
        else:
            completion_start = end_time

        request_id = self._uuid()
        messages, prompt_chars = self._messages(call_type, large)
        answer = "" if failed or call_type == "aembedding" else self._text(_ANSWER_MEDIAN_CHARS)
        prompt_tokens = 0 if failed else max(1, prompt_chars // 4)
        completion_tokens = len(answer) // 4
        spend = 0.0 if failed else prompt_tokens * prompt_price + completion_tokens * completion_price
        cache_hit = not failed and rng.random() < 0.05
        key_index = rng.randrange(len(self._api_keys))
        api_key = "" if rng.random() < 0.01 else self._api_keys[key_index]
        team_id = self._teams[key_index % len(self._teams)] if rng.random() < 0.7 else None
        organization_id = self._orgs[key_index % len(self._orgs)] if team_id and rng.random() < 0.7 else None
        user = self._pick(self._users) if rng.random() < 0.8 else self._pick(("", None))
        end_user = self._pick(self._end_users) if rng.random() < 0.5 else self._pick(("", None, None))
        ip = self._pick(self._ips) if rng.random() < 0.7 else None
        tags = rng.sample(_TAGS, self._pick((0, 0, 1, 1, 2, 3))) if rng.random() < 0.98 else None

        return {
            "request_id": request_id,
            "call_type": call_type,
            "api_key": api_key,
            "spend": spend,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "startTime": start_time,
            "endTime": end_time,
            "completionStartTime": completion_start,
            "model": "" if failed and rng.random() < 0.5 else model,
            "model_id": self._model_ids[model_index] if rng.random() < 0.9 else "",
            "model_group": model,
            "custom_llm_provider": provider,
            "api_base": api_base if rng.random() < 0.95 else "",
            "user": user,
            "metadata": self._metadata(api_key, key_index, team_id, user, ip, failed, model),
            "cache_hit": "True" if cache_hit else self._pick(("False", "False", "False", "")),
            "cache_key": f"{rng.getrandbits(256):064x}" if cache_hit else self._pick(("", "Cache OFF")),
            "request_tags": tags,
            "team_id": team_id,
            "organization_id": organization_id,
            "end_user": end_user,
            "requester_ip_address": ip,
            "messages": messages,
            "response": {} if failed else self._response(request_id, model, start_time, call_type, answer, prompt_tokens, completion_tokens),
            "session_id": self._uuid() if rng.random() < 0.3 else None,
            "status": "failure" if failed else "success",
            "mcp_namespaced_tool_name": self._pick(("github-create_issue", "jira-search", "fs-read_file")) if rng.random() < 0.03 else None,
            "agent_id": self._uuid() if rng.random() < 0.02 else None,
            "proxy_server_request": self._proxy_request(model, end_user, streamed, call_type),
            "request_duration_ms": duration_ms,
            "litellm_call_id": self._uuid() if rng.random() < 0.95 else None,
        }

    def _messages(self, call_type: str, large: bool) -> tuple[Any, int]:
        """Return the messages value and the prompt length in characters that token counts derive from."""
        rng = self._rng
        if not large and rng.random() < 0.08:
            # Prompt storage turned off, or cleared by an operator.
            return {}, rng.randrange(20, 4000)
        if call_type == "aembedding":
            inputs = [self._text(120) for _ in range(rng.randrange(1, 4))]
            return {"input": inputs}, sum(map(len, inputs))
        if call_type == "atext_completion":
            prompt = self._text(_PROMPT_MEDIAN_CHARS)
            return [{"role": "user", "content": prompt}], len(prompt)

        messages: list[dict[str, Any]] = [{"role": "system", "content": self._pick(_SYSTEM_PROMPTS)}]
        for _ in range(self._pick((0, 0, 0, 1, 2))):
            messages.append({"role": "user", "content": self._text(_PROMPT_MEDIAN_CHARS // 2)})
            messages.append({"role": "assistant", "content": self._text(_ANSWER_MEDIAN_CHARS // 2)})
        messages.append({"role": "user", "content": self._text(_PROMPT_MEDIAN_CHARS)})
        if large:
            messages.append(self._large_message())
        chars = sum(len(m["content"]) if isinstance(m["content"], str) else 1000 for m in messages)
        return messages, chars

    def _large_message(self) -> dict[str, Any]:
        """Return a user message whose JSON takes about large_row_min..max bytes."""
        rng = self._rng
        size = rng.randint(self.large_row_min_bytes, self.large_row_max_bytes)
        if rng.random() < 0.5:
            # A vision request: base64 of random bytes, which does not compress.
            encoded = base64.b64encode(rng.randbytes(size * 3 // 4)).decode("ascii")
            return {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded}},
                ],
            }
        # A long document pasted into the prompt, cut from the corpus piece by piece.
        pieces: list[str] = []
        remaining = size
        while remaining > 0:
            length = min(remaining, _CORPUS_CHARS // 2)
            offset = rng.randrange(_CORPUS_CHARS - length)
            pieces.append(self._corpus[offset:offset + length])
            remaining -= len(pieces[-1].encode("utf-8"))
        return {"role": "user", "content": "Summarize this document:\n" + "".join(pieces)}

    def _response(
        self,
        request_id: str,
        model: str,
        start_time: datetime,
        call_type: str,
        answer: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> dict[str, Any]:
        created = int(start_time.replace(tzinfo=timezone.utc).timestamp())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if call_type == "aembedding":
            return {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0}], "usage": usage}
        return {
            "id": "chatcmpl-" + request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "finish_reason": self._pick(_FINISH_REASONS),
                "message": {"role": "assistant", "content": answer, "tool_calls": None},
            }],
            "usage": usage,
        }

    def _metadata(
        self,
        api_key: str,
        key_index: int,
        team_id: str | None,
        user: str | None,
        ip: str | None,
        failed: bool,
        model: str,
    ) -> dict[str, Any]:
        rng = self._rng
        metadata: dict[str, Any] = {
            "user_api_key": api_key,
            "user_api_key_alias": self._key_aliases[key_index],
            "user_api_key_team_id": team_id,
            "user_api_key_org_id": None,
            "user_api_key_user_id": user,
            "user_api_key_team_alias": None if team_id is None else f"team-{team_id[:8]}",
            "user_api_key_end_user_id": None,
            "requester_ip_address": ip,
            "spend_logs_metadata": {"trace_id": self._uuid()} if rng.random() < 0.2 else None,
            "applied_guardrails": ["pii-mask"] if rng.random() < 0.1 else [],
            "batch_models": None,
            "mcp_tool_call_metadata": None,
            "vector_store_request_metadata": None,
            "model_map_information": {
                "model_map_key": model,
                "model_map_value": {"max_tokens": 128000, "input_cost_per_token": 2.5e-6, "supports_vision": True},
            },
            "usage_object": {"completion_tokens_details": {"reasoning_tokens": 0}, "prompt_tokens_details": {"cached_tokens": self._pick((0, 0, 1024))}},
            "additional_usage_values": {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            "status": "failure" if failed else "success",
            "proxy_server_request": None,
            "hidden_params": {"litellm_overhead_time_ms": round(rng.uniform(1, 40), 3), "api_base": None, "response_cost": None},
        }
        if failed:
            error_class = self._pick(("RateLimitError", "APIConnectionError", "BadRequestError", "Timeout"))
            metadata["error_information"] = {
                "error_code": self._pick(("429", "500", "400", "408")),
                "error_class": error_class,
                "llm_provider": "openai",
                "error_message": f"litellm.{error_class}: " + self._text(150),
                "traceback": "Traceback (most recent call last):\n  " + self._text(600),
            }
        return metadata

    def _proxy_request(self, model: str, end_user: str | None, streamed: bool, call_type: str) -> dict[str, Any]:
        route = {
            "aembedding": "/v1/embeddings",
            "atext_completion": "/v1/completions",
        }.get(call_type, "/v1/chat/completions")
        return {
            "url": "http://localhost:4000" + route,
            "method": "POST",
            "headers": {
                "content-type": "application/json",
                "user-agent": self._pick(("OpenAI/Python 1.54.3", "langchain/0.3", "curl/8.5.0")),
                "x-request-source": self._pick(("web", "batch", "cli")),
            },
            "body": {
                "model": model,
                "temperature": self._pick((0, 0.2, 0.7, 1)),
                "max_tokens": self._pick((256, 1024, 4096, None)),
                "stream": streamed,
                "user": end_user,
            },
        }


def _measure_generation(count: int = 50_000) -> None:
    """Print how long RowGenerator takes to make `count` rows, and their JSON size."""
    end = datetime(2025, 1, 1)
    started = time.perf_counter()
    rows = RowGenerator(1, end - timedelta(days=30), end).rows(count)
    elapsed = time.perf_counter() - started
    sizes = [json_size(row) for row in rows]
    print(
        f"{count} rows in {elapsed:.2f} s ({count / elapsed:,.0f} rows/s); "
        f"JSON size mean {sum(sizes) / count:,.0f} bytes, max {max(sizes):,} bytes, "
        f"rows over 200 KB: {sum(size > 200_000 for size in sizes)}"
    )


if __name__ == "__main__":
    _measure_generation()
