"""The provider as Airflow loads it: registered, and the aicenter connection form renders our fields."""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.launchers.base import LAUNCHERS

pytestmark = pytest.mark.airflow

FIELDS = {"storage", "aws_conn_id", "launcher", "image", "namespace"}
PLUGINS = '''
import json
from airflow import plugins_manager
[plugin] = [p for p in plugins_manager.get_plugin_info() if p["name"] == "aicenter"]
print("PLUGIN=" + json.dumps(plugin, default=str))
'''

#: What the UI's connection form is built from (GET /ui/connections/hook_meta).
HOOK_META = '''
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
[meta] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "aicenter"]
print("META=" + meta.model_dump_json())
'''


def test_provider_registers_the_connection_form(airflow_env):
    done = airflow_env.run("airflow", "providers", "get", "airflow-aicenter", "--full", "-o", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    [info] = json.loads(done.stdout)
    [conn] = info["connection-types"]
    assert conn["connection-type"] == "aicenter" and conn["hook-class-name"] == "airflow_aicenter.hooks.aicenter.AICenterHook"
    assert set(conn["conn-fields"]) >= FIELDS, "the DESIGN.md extras (other fields may be added)"
    links = {"airflow_aicenter.operators.links.ResultsLink", "airflow_aicenter.operators.links.ArtifactsLink"}
    assert set(info["extra-links"]) == links

    done = airflow_env.run("python", "-c", HOOK_META)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(done.stdout.split("META=", 1)[1])
    assert meta["hook_name"] == "AI Center" and set(meta["extra_fields"]) >= FIELDS
    assert meta["extra_fields"]["storage"]["schema"]["title"] == "Storage URI"
    # Launcher: a choice of the two launchers, "local" by default; never a literal "null" option
    launcher = meta["extra_fields"]["launcher"]
    assert launcher["schema"]["enum"] == list(LAUNCHERS) and None not in launcher["schema"]["enum"]
    assert launcher["value"] == "local" and launcher["schema"]["default"] == "local"
    # every text field suggests what to type (the form's placeholder for extra fields is its examples)
    for name, field in meta["extra_fields"].items():
        if "enum" not in field["schema"]:
            assert field["schema"].get("examples"), f"{name} has no examples"
    # the standard fields this connection does not use are hidden from the form
    standard = meta["standard_fields"]
    assert all(standard[f]["hidden"] for f in ("host", "port", "login", "password", "url_schema"))


@pytest.mark.parametrize("lazy", ["True", "False"])
def test_the_ui_plugin_is_loaded_once_whether_providers_are_discovered_lazily_or_not(airflow_env, lazy):
    """Registered in the provider info and as an entry point: Airflow's default (lazy) reads only the latter."""
    done = airflow_env.run("python", "-c", PLUGINS, extra_env={"AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": lazy})
    assert done.returncode == 0, done.stderr[-3000:]
    plugin = json.loads(done.stdout.split("PLUGIN=", 1)[1])
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/aicenter"]
    [view] = plugin["external_views"]
    assert view["name"] == "ML Packages" and view["href"] == "aicenter/"


def test_provider_info_registers_the_plugin_and_the_hook_can_be_tested():
    from airflow_aicenter.provider_info import get_provider_info

    info = get_provider_info()
    assert info["plugins"] == [{"name": "aicenter", "plugin-class": "airflow_aicenter.plugins.AICenterPlugin"}]
    assert callable(AICenterHook.test_connection)  # the form's Test button (behaviour: tests/ui/test_parts.py)
