"""Exceptions the playbook tasks raise on purpose."""

from __future__ import annotations

__all__ = ["RunRefused"]


class RunRefused(ValueError):
    """A playbook run was asked to act on an incident it may not take (wrong state or type).

    The run fails with this message for the human who started it; nobody is paged, because nothing
    went wrong with the incident itself.
    """
