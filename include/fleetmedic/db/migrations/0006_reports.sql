-- Trend reports (incident_trends): one report_runs row per (report, period); every report table
-- hangs off it with ON DELETE CASCADE, so re-running a period replaces it in one transaction.

CREATE TABLE report_runs (
    id            bigserial PRIMARY KEY,
    report        text NOT NULL DEFAULT 'incident_trends',
    period        text NOT NULL,                 -- what was asked for, e.g. '7d'
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,          -- exclusive
    as_of         timestamptz NOT NULL,          -- min(period_end, generation time): stale is judged here
    generated_at  timestamptz NOT NULL DEFAULT now(),
    generated_by  text NOT NULL,                 -- automation:<dag>/<task> | human:<name>
    incidents     integer NOT NULL DEFAULT 0,    -- incidents opened in the period
    events        bigint NOT NULL DEFAULT 0,     -- their audit events
    duration_s    double precision,
    html_path     text,                          -- the rendered report, when written to disk
    CHECK (period_end > period_start),
    UNIQUE (report, period_start, period_end)
);
CREATE INDEX report_runs_latest ON report_runs (report, generated_at DESC);

-- "Total incidents: type / count"
CREATE TABLE report_total_incidents (
    run_id     bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    type       text NOT NULL,
    incidents  integer NOT NULL,
    PRIMARY KEY (run_id, type)
);

-- "Stale incidents (over 2 days old): type / state / count", as of report_runs.as_of
CREATE TABLE report_stale_incidents (
    run_id     bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    type       text NOT NULL,
    state      text NOT NULL,
    incidents  integer NOT NULL,
    PRIMARY KEY (run_id, type, state)
);

-- "Kernel panics in last week": one row per kernel_panic incident opened in the period
CREATE TABLE report_kernel_panics (
    run_id       bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    incident_id  bigint NOT NULL,
    resource     text NOT NULL,
    server       text,
    opened_at    timestamptz NOT NULL,
    state        text NOT NULL,
    resolved_at  timestamptz,
    PRIMARY KEY (run_id, incident_id)
);

-- Automation outcome per type, plus a '(all)' row. held and escalated may overlap (held by a breaker, then paged).
CREATE TABLE report_automation (
    run_id             bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    type               text NOT NULL,
    incidents          integer NOT NULL,
    auto_resolved      integer NOT NULL,   -- resolved by automation or detection, never escalated
    escalated          integer NOT NULL,   -- a human was paged at some point
    held               integer NOT NULL,   -- a breaker, silence or guard held it at some point
    human_resolved     integer NOT NULL,   -- resolved by a human:<name>
    ignored            integer NOT NULL,
    still_active       integer NOT NULL,   -- not resolved or ignored yet
    auto_resolved_pct  double precision NOT NULL,
    escalated_pct      double precision NOT NULL,
    held_pct           double precision NOT NULL,
    mttr_p50_s         double precision,   -- opened -> resolved event, resolved incidents only
    mttr_p95_s         double precision,
    PRIMARY KEY (run_id, type)
);

-- Pages per incident type (pages created in the period; '(no incident)' for run failures)
CREATE TABLE report_pages (
    run_id           bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    type             text NOT NULL,
    pages            integer NOT NULL,
    incidents_paged  integer NOT NULL,
    delivered        integer NOT NULL,
    undelivered      integer NOT NULL,
    PRIMARY KEY (run_id, type)
);

-- Resources paged twice or more for the same type: the list of what to fix for good
CREATE TABLE report_repeat_pages (
    run_id          bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    resource        text NOT NULL,
    type            text NOT NULL,
    pages           integer NOT NULL,
    incidents       integer NOT NULL,
    first_paged_at  timestamptz NOT NULL,
    last_paged_at   timestamptz NOT NULL,
    PRIMARY KEY (run_id, resource, type)
);

-- Breaker trips (breaker_events entering 'open') per breaker
CREATE TABLE report_breaker_trips (
    run_id        bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    breaker       text NOT NULL,
    trips         integer NOT NULL,
    first_trip_at timestamptz NOT NULL,
    last_trip_at  timestamptz NOT NULL,
    last_reason   text NOT NULL,
    PRIMARY KEY (run_id, breaker)
);

-- Shadow mode: incidents a shadow playbook saw, and how many it would have resolved
CREATE TABLE report_shadow (
    run_id               bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    type                 text NOT NULL,
    shadow_incidents     integer NOT NULL,
    would_have_resolved  integer NOT NULL,
    would_have_resolved_pct double precision NOT NULL,
    PRIMARY KEY (run_id, type)
);

-- Per day (UTC) and type, plus a '(all)' row per day: the series behind the charts (incidents per day,
-- MTTR trend, automation rate)
CREATE TABLE report_daily (
    run_id         bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    day            date NOT NULL,
    type           text NOT NULL,
    incidents      integer NOT NULL,
    auto_resolved  integer NOT NULL,
    escalated      integer NOT NULL,
    resolved       integer NOT NULL,
    mttr_p50_s     double precision,
    PRIMARY KEY (run_id, day, type)
);

-- The rendered PNG charts, so the Airflow UI page can show them without sharing a disk with workers
CREATE TABLE report_charts (
    run_id  bigint NOT NULL REFERENCES report_runs(id) ON DELETE CASCADE,
    name    text NOT NULL,
    title   text NOT NULL,
    png     bytea NOT NULL,
    PRIMARY KEY (run_id, name)
);
