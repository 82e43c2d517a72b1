"""The provider as Airflow loads it: registered, and the aicenter connection form renders our fields."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.airflow

FIELDS = {"storage", "aws_conn_id", "launcher", "image", "namespace"}

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
    assert FIELDS <= set(conn["conn-fields"]), "the DESIGN.md extras (other fields may be added)"
    assert set(info["extra-links"]) == {"airflow_aicenter.operators.links.ResultsLink", "airflow_aicenter.operators.links.ArtifactsLink"}

    done = airflow_env.run("python", "-c", HOOK_META)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(done.stdout.split("META=", 1)[1])
    assert meta["hook_name"] == "AI Center" and FIELDS <= set(meta["extra_fields"])
    assert meta["extra_fields"]["storage"]["schema"]["title"] == "Storage URI"
    assert meta["extra_fields"]["launcher"]["schema"]["enum"] == ["local", "kubernetes", None]
    # the standard fields this connection does not use are hidden from the form
    standard = meta["standard_fields"]
    assert all(standard[f]["hidden"] for f in ("host", "port", "login", "password", "url_schema"))
