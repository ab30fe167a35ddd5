"""fleetmedic: automatic incident resolution for PostgreSQL and Redis fleets on Apache Airflow 3."""

__version__ = "0.1.0"
