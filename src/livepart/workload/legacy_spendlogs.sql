-- The "LiteLLM_SpendLogs" table as a long-lived LiteLLM proxy install has it,
-- with its indexes and the seven reporting views that read it.
--
-- Names are unqualified: livepart.workload.litellm.create_legacy_schema sets
-- search_path to the target schema before it runs this file.
--
-- The physical column order follows the order of the migrations that built the
-- table, not the order of the Prisma model. The first CREATE TABLE contains the
-- original columns, and each later ALTER TABLE appends columns at the end.
-- Code that reads or writes this table must name its columns and never rely
-- on their positions.
--
-- "startTime", "endTime" and "completionStartTime" are timestamp(3) without
-- time zone, and the proxy stores UTC wall-clock values in them.

CREATE TABLE "LiteLLM_SpendLogs" (
    "request_id" TEXT NOT NULL,
    "call_type" TEXT NOT NULL,
    "api_key" TEXT NOT NULL DEFAULT '',
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "total_tokens" INTEGER NOT NULL DEFAULT 0,
    "prompt_tokens" INTEGER NOT NULL DEFAULT 0,
    "completion_tokens" INTEGER NOT NULL DEFAULT 0,
    "startTime" TIMESTAMP(3) NOT NULL,
    "endTime" TIMESTAMP(3) NOT NULL,
    "completionStartTime" TIMESTAMP(3),
    "model" TEXT NOT NULL DEFAULT '',
    "model_id" TEXT DEFAULT '',
    "model_group" TEXT DEFAULT '',
    "custom_llm_provider" TEXT DEFAULT '',
    "api_base" TEXT DEFAULT '',
    "user" TEXT DEFAULT '',
    "metadata" JSONB DEFAULT '{}',
    "cache_hit" TEXT DEFAULT '',
    "cache_key" TEXT DEFAULT '',
    "request_tags" JSONB DEFAULT '[]',
    "team_id" TEXT,
    "end_user" TEXT,
    "requester_ip_address" TEXT,
    "messages" JSONB DEFAULT '{}',
    "response" JSONB DEFAULT '{}',
    CONSTRAINT "LiteLLM_SpendLogs_pkey" PRIMARY KEY ("request_id")
);

CREATE INDEX "LiteLLM_SpendLogs_startTime_idx" ON "LiteLLM_SpendLogs" ("startTime");
CREATE INDEX "LiteLLM_SpendLogs_end_user_idx" ON "LiteLLM_SpendLogs" ("end_user");

-- Columns and indexes added by later migrations, in the order they ran.
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "proxy_server_request" JSONB DEFAULT '{}';
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "session_id" TEXT;
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "status" TEXT;
CREATE INDEX "LiteLLM_SpendLogs_session_id_idx" ON "LiteLLM_SpendLogs" ("session_id");
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "mcp_namespaced_tool_name" TEXT;
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "organization_id" TEXT;
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "agent_id" TEXT;
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "request_duration_ms" INTEGER;
CREATE INDEX "LiteLLM_SpendLogs_startTime_request_id_idx"
    ON "LiteLLM_SpendLogs" ("startTime", "request_id");
CREATE INDEX "LiteLLM_SpendLogs_api_key_startTime_spend_idx"
    ON "LiteLLM_SpendLogs" ("api_key", "startTime", "spend");
ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN "litellm_call_id" TEXT;
CREATE INDEX "LiteLLM_SpendLogs_litellm_call_id_idx" ON "LiteLLM_SpendLogs" ("litellm_call_id");

-- Reporting views. The proxy creates each of them only when it is missing, so
-- an install keeps whatever body its first version wrote. The bodies below are
-- simplified, but the view names and output column names match the proxy's.
-- A view binds to the table's OID when it is created, so after a rename it
-- keeps reading the renamed table until it is dropped and created again.
--
-- "Last 30 days" compares against the current UTC wall-clock time, because
-- "startTime" contains UTC wall-clock values.

CREATE VIEW "MonthlyGlobalSpend" AS
SELECT date_trunc('day', "startTime") AS date,
       SUM("spend") AS spend
FROM "LiteLLM_SpendLogs"
WHERE "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
GROUP BY 1;

CREATE VIEW "Last30dKeysBySpend" AS
SELECT "api_key",
       SUM("spend") AS total_spend
FROM "LiteLLM_SpendLogs"
WHERE "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
GROUP BY "api_key";

CREATE VIEW "Last30dModelsBySpend" AS
SELECT "model",
       SUM("spend") AS total_spend
FROM "LiteLLM_SpendLogs"
WHERE "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
  AND "model" != ''
GROUP BY "model";

CREATE VIEW "MonthlyGlobalSpendPerKey" AS
SELECT date_trunc('day', "startTime") AS date,
       SUM("spend") AS spend,
       "api_key"
FROM "LiteLLM_SpendLogs"
WHERE "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
GROUP BY 1, "api_key";

CREATE VIEW "MonthlyGlobalSpendPerUserPerKey" AS
SELECT date_trunc('day', "startTime") AS date,
       SUM("spend") AS spend,
       "api_key",
       "user"
FROM "LiteLLM_SpendLogs"
WHERE "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
GROUP BY 1, "api_key", "user";

-- jsonb_array_elements_text raises an error on a non-array value, so this view
-- fails if any row contains an object or a scalar in request_tags. NULL is fine.
CREATE VIEW "DailyTagSpend" AS
SELECT tag.value AS individual_request_tag,
       date_trunc('day', "startTime") AS spend_date,
       COUNT(*) AS log_count,
       SUM("spend") AS total_spend
FROM "LiteLLM_SpendLogs",
     jsonb_array_elements_text("request_tags") AS tag(value)
GROUP BY 1, 2;

CREATE VIEW "Last30dTopEndUsersSpend" AS
SELECT "end_user",
       COUNT(*) AS total_events,
       SUM("spend") AS total_spend
FROM "LiteLLM_SpendLogs"
WHERE "end_user" <> ''
  AND "end_user" IS NOT NULL
  AND "startTime" >= (now() AT TIME ZONE 'UTC') - INTERVAL '30 days'
GROUP BY "end_user"
ORDER BY total_spend DESC
LIMIT 100;
