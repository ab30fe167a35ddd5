"""Families of checks; each module registers its probes with fleetmedic.detection.checks.register_check."""
