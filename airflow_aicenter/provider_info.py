"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_aicenter import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-aicenter",
        "name": "AI Center",
        "description": "AI-Center-style ML pipelines (train, evaluate, full) with a versioned package registry.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": "aicenter",
                "hook-class-name": "airflow_aicenter.hooks.aicenter.AICenterHook",
                "hook-name": "AI Center",
                # With conn-fields, Airflow >= 3.2 no longer asks the hook's get_ui_field_behaviour():
                # the unused standard fields are hidden here, or the form would show them.
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "password", "host"],
                    "relabeling": {},
                    "placeholders": {},
                },
                "conn-fields": {
                    # String fields show their "examples" as the input's suggestions (the form's only
                    # placeholder for extra fields); an empty field means the default in the description.
                    "storage": {
                        "label": "Storage URI",
                        "description": "s3://bucket/prefix, or file:///absolute/path (empty: $AIRFLOW_HOME/aicenter)",
                        "schema": {"type": ["string", "null"], "examples": ["s3://my-bucket/aicenter", "file:///data/aicenter"]},
                    },
                    "aws_conn_id": {
                        "label": "AWS connection id",
                        "description": "Credentials, endpoint URL and region for an s3:// store (empty: the AWS_* variables)",
                        "schema": {"type": ["string", "null"], "examples": ["aws_default"]},
                    },
                    "launcher": {
                        "label": "Launcher",
                        "description": "local (a child process of the worker) or kubernetes (a pod per run)",
                        # No null choice: a select shows null as a literal "null" option.
                        "schema": {"type": "string", "enum": ["local", "kubernetes"], "default": "local"},
                    },
                    "image": {
                        "label": "Runtime image",
                        "description": "Image with airflow_aicenter.runtime, for the kubernetes launcher",
                        "schema": {"type": ["string", "null"], "examples": ["registry.example.com/aicenter-runtime:0.1.0"]},
                    },
                    "namespace": {
                        "label": "Namespace",
                        "description": "Kubernetes namespace for training pods (empty: the worker's)",
                        "schema": {"type": ["string", "null"], "examples": ["default", "ml-training"]},
                    },
                    "aws_secret_name": {
                        "label": "Pods' S3 Secret",
                        "description": "Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) "
                        "for training pods; empty: the pods' service account (IRSA, workload identity)",
                        "schema": {"type": ["string", "null"], "examples": ["aicenter-s3"]},
                    },
                    "runtime_role_arn": {
                        "label": "Run role ARN",
                        "description": "IAM role the worker assumes for each pod run with a session policy limited to that run's "
                        "folder (least privilege); empty: pods use their own identity",
                        "schema": {"type": ["string", "null"], "examples": ["arn:aws:iam::123456789012:role/aicenter-runtime"]},
                    },
                    "runtime_role_duration": {
                        "label": "Run credentials lifetime (s)",
                        "description": "Seconds the per-run credentials last (900 to 43200; at least the run's timeout)",
                        "schema": {"type": ["integer", "null"], "examples": [3600]},
                    },
                    "package_indexes": {
                        "label": "Package indexes",
                        "description": "Private package indexes for requirements.txt, comma-separated (the first is the "
                        "index URL); credentials go in a netrc file, not in the URL",
                        "schema": {"type": ["string", "null"], "examples": ["https://pypi.internal.example.com/simple"]},
                    },
                    "run_as_user": {
                        "label": "Run package code as",
                        "description": "Local launcher: a user name or uid that package code runs as, so it cannot read the "
                        "worker's processes and files, the store folder nor the run spec (the worker must run as root); "
                        "empty: the worker's own user (trusted code only)",
                        "schema": {"type": ["string", "null"], "examples": ["nobody"]},
                    },
                    "allowed_dataset_roots": {
                        "label": "Allowed dataset folders",
                        "description": "Comma-separated folders file:// datasets must lie in (empty: any)",
                        "schema": {"type": ["string", "null"], "examples": ["/data/datasets"]},
                    },
                },
            }
        ],
        "hooks": [{"integration-name": "AI Center", "python-modules": ["airflow_aicenter.hooks.aicenter"]}],
        "operators": [{"integration-name": "AI Center", "python-modules": ["airflow_aicenter.operators.pipeline"]}],
        "triggers": [{"integration-name": "AI Center", "python-modules": ["airflow_aicenter.triggers.dataset"]}],
        # aicenter://<package>: validated when a DAG is parsed, and reported to OpenLineage as namespace "aicenter"
        "asset-uris": [
            {
                "schemes": ["aicenter"],
                "handler": "airflow_aicenter.assets.sanitize_uri",
                "factory": "airflow_aicenter.assets.create_asset",
                "to_openlineage_converter": "airflow_aicenter.assets.convert_asset_to_openlineage",
            }
        ],
        "integrations": [
            {
                "integration-name": "AI Center",
                "external-doc-url": "aicenter/docs/",  # served by the api-server (the plugin), as the Providers page link
                "tags": ["software"],
            }
        ],
        # The AI Center pages (/aicenter in the api-server) and their "ML Packages" navigation entry.
        "plugins": [{"name": "aicenter", "plugin-class": "airflow_aicenter.plugins.AICenterPlugin"}],
        "extra-links": [
            "airflow_aicenter.operators.links.ResultsLink",
            "airflow_aicenter.operators.links.ArtifactsLink",
        ],
    }
