"""Airflow plugin: the fleetmedic page (open incidents, breakers, trends) in Airflow's navigation.

The page is a FastAPI app mounted by the api-server at /fleetmedic, behind Airflow's own login;
the code lives in fleetmedic.airflow.ui_plugin.
"""

from airflow.plugins_manager import AirflowPlugin

from fleetmedic.airflow.ui_plugin import EXTERNAL_VIEW, URL_PREFIX, create_app


class FleetmedicPlugin(AirflowPlugin):
    name = "fleetmedic"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "fleetmedic"}]
    external_views = [EXTERNAL_VIEW]
