-- Checks and balances: the current state of each circuit breaker (the source of truth for "is it
-- open"; every change is also appended to breaker_events, and a trip is a breaker_events row with
-- state 'open'), plus indexes for the cooldown and action-window queries over incident_events.
-- Redis holds only the fast sliding window of admitted runs and the short resource leases.

CREATE TABLE breakers (
    name               text PRIMARY KEY,        -- 'global' or 'playbook:<type>'
    state              text NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
    version            integer NOT NULL DEFAULT 1,
    reason             text NOT NULL DEFAULT '',
    changed_at         timestamptz NOT NULL DEFAULT now(),
    changed_by         text NOT NULL DEFAULT 'automation:fleetmedic/breakers',
    trip_event_id      bigint REFERENCES breaker_events(id),   -- the trip that opened it: its page's dedup key
    half_open_after    timestamptz,     -- an automatic trip lets one probe through after this; NULL: a human resets it
    cooldown           interval,        -- how long an automatic trip stays open (again after a failed probe)
    probe_incident_id  bigint REFERENCES incidents(id) ON DELETE SET NULL,  -- half_open: the one run let through
    window_since       timestamptz      -- admissions before this (the last close) do not count; NULL: never closed
);

-- Cooldown: "did automation act on this (resource, type) lately" reads the 'acting' step events.
CREATE INDEX incident_events_acting ON incident_events (incident_id, at)
    WHERE data->>'step_status' = 'acting';

-- Rebuilding a playbook's action window after Redis lost it reads the gate's 'proceed' decisions.
CREATE INDEX incident_events_gate_proceed ON incident_events (at)
    WHERE step = 'gate' AND data->>'gate' = 'proceed';

-- Breaker history per breaker over time (console, reports).
CREATE INDEX breaker_events_at ON breaker_events (at);

-- Who lifted a silence early, and why (the audit of a human override).
ALTER TABLE silences ADD COLUMN removed_by text, ADD COLUMN removed_reason text;
