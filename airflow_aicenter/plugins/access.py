"""Who may see what: Airflow's own authentication and DAG-level authorization for the AI Center pages.

Plugin endpoints are not protected by the api-server on their own. Every page depends on
:data:`UserDep` (the api-server's ``get_user``: a bearer token, or the ``_token`` cookie the
UI sets at sign-in), and a run belongs to a DAG: showing it, or naming it in a page or an
error, needs read access to that DAG, as the auth manager decides (roles in
SimpleAuthManager, DAG permissions in FAB, teams). A page gets the decisions through
:data:`AccessDep`, one :class:`DagAccess` per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends, HTTPException, status

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser

#: The signed-in user (401 when there is none); re-exported so the routes name one dependency.
UserDep = GetUserDep


def can_read_dag(user: BaseUser, dag_id: str) -> bool:
    """Whether ``user`` may read ``dag_id`` (its runs, task instances and so its AI Center runs)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    return bool(get_auth_manager().is_authorized_dag(method="GET", details=details, user=user))


class DagAccess:
    """What one request's user may read, DAG by DAG.

    A page or an error message names runs (``dag/run/task/try``) only after asking this: the
    auth manager is asked once per DAG per request, since a listing names many runs of few DAGs.
    """

    def __init__(self, decide: Callable[[str], bool]) -> None:
        self._decide = decide
        self._known: dict[str, bool] = {}

    def can_read(self, dag_id: str) -> bool:
        if dag_id not in self._known:
            self._known[dag_id] = bool(self._decide(dag_id))
        return self._known[dag_id]

    def require(self, dag_id: str) -> None:
        """403 unless the user may read ``dag_id`` (a DAG the request itself named: the message names nothing new)."""
        if not self.can_read(dag_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"you do not have read access to DAG {dag_id!r}, so not to its runs")


def dag_access(user: UserDep) -> DagAccess:
    """The request's :class:`DagAccess`: the signed-in user's read access, as the auth manager decides it."""
    return DagAccess(lambda dag_id: can_read_dag(user, dag_id))


AccessDep = Annotated[DagAccess, Depends(dag_access)]


def login_url(next_url: str) -> str:
    """Where the auth manager signs people in, coming back to ``next_url`` afterwards."""
    from airflow.api_fastapi.app import get_auth_manager

    return str(get_auth_manager().get_url_login(next_url=next_url))
