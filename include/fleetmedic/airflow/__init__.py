"""The only fleetmedic package that imports Airflow: sensors, triggers, operators, callbacks, DAG builders."""
