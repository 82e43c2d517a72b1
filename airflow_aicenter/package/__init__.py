"""The ML package contract: names, versions, static validation (AST, no import) and safe zips.

Imports neither Airflow nor Kubernetes: the runtime image uses it too.
"""

from airflow_aicenter.package.archive import ZipDigest, extract_zip, open_package, write_zip
from airflow_aicenter.package.names import validate_package_name
from airflow_aicenter.package.validate import (
    CONTRACT_FILES,
    EXPECTED_PARAMS,
    MAIN_METHODS,
    MAX_CONTRACT_FILE_BYTES,
    PIPELINES,
    REQUIRED_METHODS,
    PackageInfo,
    PackageMetadata,
    find_package_root,
    is_contract_file,
    iter_package_files,
    validate_package,
)
from airflow_aicenter.package.version import Version, VersionSpec, parse_version_spec, validate_alias_name

__all__ = [
    "CONTRACT_FILES",
    "EXPECTED_PARAMS",
    "MAIN_METHODS",
    "MAX_CONTRACT_FILE_BYTES",
    "PIPELINES",
    "REQUIRED_METHODS",
    "PackageInfo",
    "PackageMetadata",
    "Version",
    "VersionSpec",
    "ZipDigest",
    "extract_zip",
    "find_package_root",
    "is_contract_file",
    "iter_package_files",
    "open_package",
    "parse_version_spec",
    "validate_alias_name",
    "validate_package",
    "validate_package_name",
    "write_zip",
]
