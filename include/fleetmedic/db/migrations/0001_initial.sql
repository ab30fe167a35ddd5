-- fleetmedic ops database: inventory, health, incidents and their audit trail, pager outbox,
-- silences and breaker history.

CREATE TABLE servers (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    provider    text NOT NULL DEFAULT 'local',          -- local | aws
    address     text,                                    -- instance id, host name, ...
    state       text NOT NULL DEFAULT 'running',
    attrs       jsonb NOT NULL DEFAULT '{}'::jsonb,       -- provider specifics (local: dirs, console log)
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resources (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('postgres', 'redis')),
    role        text NOT NULL DEFAULT 'primary' CHECK (role IN ('primary', 'follower', 'standalone')),
    server_id   bigint REFERENCES servers(id) ON DELETE SET NULL,
    host        text NOT NULL,
    port        integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    primary_id  bigint REFERENCES resources(id) ON DELETE SET NULL,  -- a follower's primary
    attrs       jsonb NOT NULL DEFAULT '{}'::jsonb,                  -- local: data dir, base dir
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX resources_server ON resources (server_id);

-- Latest result per (resource, check); consecutive failures drive confirmation rules.
CREATE TABLE health (
    resource_id           bigint NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    check_name            text NOT NULL,
    healthy               boolean NOT NULL,
    value                 double precision,
    reason                text NOT NULL DEFAULT '',
    checked_at            timestamptz NOT NULL,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    first_failure_at      timestamptz,
    last_healthy_at       timestamptz,
    PRIMARY KEY (resource_id, check_name)
);

CREATE TABLE incidents (
    id                    bigserial PRIMARY KEY,
    resource_id           bigint NOT NULL REFERENCES resources(id),
    type                  text NOT NULL,
    state                 text NOT NULL CHECK (state IN
                            ('open', 'remediating', 'await_resolution', 'held', 'escalated', 'resolved', 'ignored')),
    version               integer NOT NULL DEFAULT 1,   -- fencing token: bumped by every transition
    step                  text,                         -- where the owning playbook run is
    owner_run_id          text,                         -- the playbook DAG run that owns it
    severity              text NOT NULL DEFAULT 'critical',
    reason                text NOT NULL DEFAULT '',     -- reason of the latest transition
    opened_at             timestamptz NOT NULL DEFAULT now(),
    last_seen_at          timestamptz NOT NULL DEFAULT now(),
    detections            integer NOT NULL DEFAULT 1,
    escalated_at          timestamptz,
    resolved_at           timestamptz,
    ignored_until         timestamptz,
    previous_incident_id  bigint REFERENCES incidents(id),  -- the resolved incident this one repeats
    data                  jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- One active incident per (resource, type): re-detection refreshes it instead of opening another.
CREATE UNIQUE INDEX incidents_one_active ON incidents (resource_id, type)
    WHERE state IN ('open', 'remediating', 'await_resolution', 'held', 'escalated');
CREATE INDEX incidents_state ON incidents (state);
CREATE INDEX incidents_type_opened ON incidents (type, opened_at);
CREATE INDEX incidents_resource_type ON incidents (resource_id, type, id);

-- Append-only audit of every transition.
CREATE TABLE incident_events (
    id           bigserial PRIMARY KEY,
    incident_id  bigint NOT NULL REFERENCES incidents(id),
    at           timestamptz NOT NULL DEFAULT now(),
    from_state   text,
    to_state     text NOT NULL,
    version      integer NOT NULL,
    step         text,
    actor        text NOT NULL,        -- automation:<dag>/<task> | human:<name> | detection:<check>
    reason       text NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX incident_events_incident ON incident_events (incident_id, id);
CREATE INDEX incident_events_at ON incident_events (at);

-- The pager outbox: written first, delivered after; never lost, never sent twice.
CREATE TABLE pages (
    id               bigserial PRIMARY KEY,
    incident_id      bigint REFERENCES incidents(id),
    dedup_key        text NOT NULL,
    action           text NOT NULL DEFAULT 'trigger' CHECK (action IN ('trigger', 'resolve')),
    severity         text NOT NULL DEFAULT 'critical',
    summary          text NOT NULL,
    details          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    backend          text,
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE UNIQUE INDEX pages_once ON pages (dedup_key, action);
CREATE INDEX pages_pending ON pages (next_attempt_at) WHERE status = 'pending';

CREATE TABLE silences (
    id           bigserial PRIMARY KEY,
    resource_id  bigint REFERENCES resources(id) ON DELETE CASCADE,  -- NULL: every resource
    type         text,                                               -- NULL: every incident type
    starts_at    timestamptz NOT NULL DEFAULT now(),
    ends_at      timestamptz NOT NULL,
    reason       text NOT NULL,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    removed_at   timestamptz,
    CHECK (ends_at > starts_at)
);
CREATE INDEX silences_active ON silences (ends_at) WHERE removed_at IS NULL;

CREATE TABLE breaker_events (
    id       bigserial PRIMARY KEY,
    breaker  text NOT NULL,           -- 'global' or 'playbook:<type>'
    state    text NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    reason   text NOT NULL,
    data     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX breaker_events_breaker ON breaker_events (breaker, id);
