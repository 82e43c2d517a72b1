"""Errors users see. Each message names the problem and the fix.

No Airflow import: the runtime and the package contract raise these too.
"""

from __future__ import annotations


class AICenterError(Exception):
    """Base class: a user-facing error whose message says what is wrong and how to fix it.

    ``retryable`` says whether trying again can help: a store that did not answer can, a
    package that breaks the contract or an unknown version cannot. The operators fail a task
    whose error is not retryable at once, without its retries
    (``airflow_aicenter.operators.base.no_retry``).
    """

    retryable: bool = True


class PackageError(AICenterError):
    """The ML package breaks the package contract (missing file, class, method, syntax)."""

    retryable = False


class ArchiveError(PackageError):
    """A package zip is unsafe or unreadable (path traversal, links, bombs, corruption)."""


class VersionError(AICenterError):
    """A version string or alias is malformed or does not exist in the registry."""

    retryable = False


class StorageError(AICenterError):
    """The object store refused or failed a request, or returned corrupt content."""


class NotFoundError(StorageError):
    """An object or prefix that must exist does not."""


class AccessDeniedError(StorageError):
    """The store refused the request for lack of permission (S3 403).

    S3 also answers 403, not 404, to a lookup of an absent key from whoever may not list it:
    run credentials list no blob (airflow_aicenter/credentials.py), so for them a refused lookup
    of a blob means "absent or unreadable", and the create-only upload that follows decides.
    """


class AlreadyExistsError(StorageError):
    """A create-once put found the key already taken."""


class DatasetError(AICenterError):
    """A dataset URI is empty, missing or unreadable."""

    retryable = False


class ConfigurationError(AICenterError):
    """A connection, launcher or operator argument is invalid."""

    retryable = False


class RunError(AICenterError):
    """A pipeline run failed (user code, runtime or launcher); the message is the one-line cause."""


class RequirementsError(RunError):
    """Installing a package's ``requirements.txt`` failed: a packaging problem, not a training error."""
