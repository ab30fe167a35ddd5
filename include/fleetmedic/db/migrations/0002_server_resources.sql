-- Servers are resources too: each server has one row of kind 'server' in `resources`, so server-level
-- incidents (server_down, kernel_panic) attach to it like any other incident, the sweep probes each
-- server once (instance.status, instance.console) rather than once per database on it, and silences,
-- breakers and reports treat servers like any resource. A server's row points at its own server
-- (server_id) and has no port.

ALTER TABLE resources DROP CONSTRAINT resources_kind_check;
ALTER TABLE resources ADD CONSTRAINT resources_kind_check CHECK (kind IN ('postgres', 'redis', 'server'));

ALTER TABLE resources ALTER COLUMN port DROP NOT NULL;
ALTER TABLE resources ADD CONSTRAINT resources_port_needed
    CHECK (port IS NOT NULL OR kind = 'server');
ALTER TABLE resources ADD CONSTRAINT resources_server_row_has_server
    CHECK (kind <> 'server' OR (server_id IS NOT NULL AND role = 'standalone'));

-- One server row per server.
CREATE UNIQUE INDEX resources_one_row_per_server ON resources (server_id) WHERE kind = 'server';
