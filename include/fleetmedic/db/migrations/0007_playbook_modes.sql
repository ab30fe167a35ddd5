-- A human can put a playbook in shadow mode at run time (`fleetmedic shadow on <type>`): automation
-- stops acting at once and records what it would have done, without a deploy. Only the playbook's
-- YAML can make it act (`limits.mode: active`, reviewed like any change); removing the override
-- (`fleetmedic shadow off`) returns to the YAML's mode. Every change is an audited event.

CREATE TABLE playbook_modes (
    type        text PRIMARY KEY,                            -- the playbook's type
    mode        text NOT NULL CHECK (mode IN ('shadow')),
    actor       text NOT NULL,                               -- human:<name>
    reason      text NOT NULL CHECK (reason <> ''),
    set_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE playbook_mode_events (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL,
    mode        text NOT NULL CHECK (mode IN ('shadow', 'playbook')),  -- playbook: override removed
    actor       text NOT NULL,
    reason      text NOT NULL CHECK (reason <> ''),
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX playbook_mode_events_type ON playbook_mode_events (type, id DESC);
