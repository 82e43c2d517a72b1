"""The one flow every AI Center pipeline operator follows; the operator is glue.

render and check the arguments (:mod:`.checks`, when the DAG is parsed and once rendered) ->
one :class:`~airflow_aicenter.completion.RunRequest` -> before compute
(:func:`airflow_aicenter.run_spec.prepare`: resolve, check, recover an earlier try, the spec)
-> launch (:mod:`.launch`: the launcher, built once per execution) -> after the run
(:mod:`airflow_aicenter.completion`: register once per task instance, promote,
``_results.json``, the XCom value, the Asset event's data) -> publish the one value it returns
(XCom, the package asset's event of :mod:`.package_asset`, a person's approval through
:mod:`airflow_aicenter.approval`). Everything but the publishing is Airflow-free. The pipeline
type is a :class:`~airflow_aicenter.plans.PipelinePlan` (data), asked and never compared by name.

The operators subclass KubernetesPodOperator so every pod setting is available as it is; only
its public extension points are used (``build_pod_request_obj``, ``get_or_create_pod``,
``trigger_reentry``, callbacks). Nothing of ours runs inside KPO's ``cleanup``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_aicenter import approval, run_spec
from airflow_aicenter.assets import OPENLINEAGE_NAMESPACE, operator_lineage
from airflow_aicenter.completion import Completion, PostRun, RunRequest, lineage
from airflow_aicenter.errors import AICenterError
from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.launchers.base import Finished, Launcher
from airflow_aicenter.launchers.pod import PodLauncher, RunCallbacks, pvc_uri, template_namespace
from airflow_aicenter.launchers.pod_spec import DEFAULT_STARTUP_TIMEOUT
from airflow_aicenter.operators import launch, package_asset
from airflow_aicenter.operators.checks import check_arguments, check_datasets, check_rendered_counts
from airflow_aicenter.operators.links import ArtifactsLink, ResultsLink, _base_url, run_page_url
from airflow_aicenter.plans import PipelinePlan
from airflow_aicenter.promotion import PromoteIf
from airflow_aicenter.records import RunRef, RunSpec, VersionRecord
from airflow_aicenter.secrets import forms

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.triggers.base import BaseTrigger
    from kubernetes.client import models as k8s

#: Our own template fields; KubernetesPodOperator's are rendered too, but shown only for pod runs.
AICENTER_TEMPLATE_FIELDS = (
    "package",
    "version",
    "dataset",
    "evaluation_dataset",
    "env",
    "dataset_volume_claim",
    "dataset_sub_path",
    "nodes",  # a count, or a template such as "{{ params.procs_per_node }}" (checked once rendered)
    "procs_per_node",
)


_NO_RETRY: dict[type[AICenterError], type[AICenterError]] = {}


def no_retry(error: AICenterError) -> AICenterError:
    """The same error, also an Airflow ``AirflowFailException``, so the task fails without retries.

    The class keeps its name and stays a subclass of the original (``except ConfigurationError``
    still catches it). Called only in the worker: the runtime never imports Airflow.
    """
    kind = type(error)
    if kind not in _NO_RETRY:
        _NO_RETRY[kind] = type(kind.__name__, (kind, AirflowFailException), {"__module__": kind.__module__})
    failed = _NO_RETRY[kind](*error.args)
    failed.__cause__ = error.__cause__
    return failed


@contextmanager
def fail_once() -> Iterator[None]:
    """Our errors that retrying cannot fix (bad input) fail the task once; transient ones are retried."""
    try:
        yield
    except AICenterError as exc:
        if exc.retryable:
            raise
        raise no_retry(exc) from exc


class BasePipelineOperator(KubernetesPodOperator):
    """Shared flow of the AI Center pipeline types. Use a subclass.

    :param package: the ML package's name in the registry. (templated)
    :param version: ``"1.2"``, ``"1"`` (latest minor of major 1), ``"latest"`` or an alias such as
        ``"production"``. (templated)
    :param dataset: the data folder (``s3://bucket/prefix/``, ``file:///path``) or a ModelArts manifest
        (``.manifest``/``.jsonl``); staged at ``data_directory``. (templated)
    :param evaluation_dataset: the evaluation data, staged at ``test_data_directory``. (templated)
    :param env: AI Center "parameters": environment variables for the package code. Values whose keys
        look secret are masked everywhere we write them. (templated)
    :param save_training_data: snapshot the training data (content-addressed, deduplicated).
    :param save_test_data: snapshot the evaluation data.
    :param gpu: ``True``/``False`` or a GPU count (per node).
    :param aicenter_conn_id: the ``aicenter`` connection (store, launcher, image, namespace).
    :param launcher: ``"kubernetes"`` or ``"local"``; default: the connection's, else local.
    :param python: the local launcher's interpreter (one with ``airflow_aicenter`` installed).
    :param cpu: CPU request of the pod (cores, or ``"500m"``).
    :param memory_gb: memory request and limit of the pod.
    :param storage_gb: the pod's work volume and ephemeral storage.
    :param dataset_volume_claim: mount this PersistentVolumeClaim read-only as the dataset instead of
        staging it (pods only). (templated)
    :param dataset_sub_path: folder inside ``dataset_volume_claim``. (templated)
    :param aws_secret_name: the Kubernetes Secret holding the pods' S3 keys (else the connection's
        ``runtime_role_arn`` session credentials, else the pod's service account).
    :param install_requirements: run user code in the package's own environment, with
        ``requirements.txt`` installed by uv and cached by content (default True, on every launcher;
        nothing is ever installed into the worker's environment). False runs user code with the
        runtime's own interpreter: an image (or worker) built with the requirements already.
    :param allow_source_builds: let the install build requirements published only as source
        distributions (default False: wheels only, so installing runs no code of the packages).
        A build runs their code: it gets no credentials, no ``env`` and, with the connection's
        ``run_as_user``, runs as that user; the environment is then cached for this package
        alone, never shared with another package.
    :param promote_to: an alias to point at the run's version when it earns it.
    :param promote_if: ``"better"`` (a strictly higher score, like with like), ``"always"`` or
        ``"approved"`` (Full and Evaluate: a person approves in Airflow's Required Actions; docs/approval.md).
    :param approval_timeout: how long ``promote_if="approved"`` waits for the person (a ``timedelta`` or
        seconds > 0, default 7 days); no answer by then rejects.
    :param nodes: machines of a distributed run (``nodes > 1``: an Indexed Job; local: must be 1).
    :param procs_per_node: user processes per machine (ranks); world size = nodes x procs_per_node.
        ``nodes`` and ``procs_per_node`` are templated: ``"{{ params.procs_per_node }}"`` takes a DAG param.
    :param checkpoint_interval: seconds between syncs of ``checkpoint_directory`` to the task's
        ``checkpoints/`` (a retry resumes from the latest complete one).
    :param progress_interval: seconds between updates of the run's ``progress.json`` and
        ``metrics.jsonl`` and the progress lines in the task log, from what package code reports
        with ``aicenter.report`` (docs/progress.md).
    :param incremental: train on the files new or changed since the parent version's snapshot (the
        parent needs one: train it with ``save_training_data=True``); the run snapshots its data too.
    :param queue_name: the Kueue LocalQueue the run waits in on Kubernetes (default: the connection extra
        ``queue_name``): its label goes on the pod or the Job, and a distributed run's Job is created
        suspended so Kueue admits all its nodes at once (docs/kubernetes.md). ``priority_class_name``
        (a KubernetesPodOperator argument) is passed through as it is.
    :param startup_timeout: how long every node of a distributed run may take to be running once the
        Job is admitted (seconds or a ``timedelta``, default 600 s); if they are not, the run fails
        naming how many were, and the Job is removed so no GPU is held half-started.
    :param kwargs: any KubernetesPodOperator argument (node selector, tolerations, pod templates,
        ``deferrable=True``, ...).
    """

    plan: ClassVar[PipelinePlan]
    template_fields: Sequence[str] = (*AICENTER_TEMPLATE_FIELDS, *KubernetesPodOperator.template_fields)
    template_fields_renderers: ClassVar[dict[str, str]] = {**KubernetesPodOperator.template_fields_renderers, "env": "json"}
    operator_extra_links = (ResultsLink(), ArtifactsLink())
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        package: str,
        version: str = "latest",
        dataset: str | None = None,
        evaluation_dataset: str | None = None,
        env: dict[str, str] | None = None,
        save_training_data: bool = False,
        save_test_data: bool = False,
        gpu: bool | int = False,
        aicenter_conn_id: str = AICenterHook.default_conn_name,
        launcher: str | None = None,
        python: str | None = None,
        cpu: float | str | None = None,
        memory_gb: float | None = None,
        storage_gb: float | None = None,
        dataset_volume_claim: str | None = None,
        dataset_sub_path: str | None = None,
        aws_secret_name: str | None = None,
        install_requirements: bool = True,
        allow_source_builds: bool = False,
        promote_to: str | None = None,
        promote_if: PromoteIf = "better",
        approval_timeout: timedelta | float = approval.DEFAULT_TIMEOUT,
        nodes: int | str = 1,
        procs_per_node: int | str = 1,
        checkpoint_interval: float = 300,
        incremental: bool = False,
        progress_interval: float = 30,
        queue_name: str | None = None,
        startup_timeout: timedelta | float = DEFAULT_STARTUP_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        # Without a termination file (a hard crash) the log tail becomes the pod's failure message.
        kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")
        # The run's own messages come from its stage and sync containers, the user's from base.
        kwargs.setdefault("init_container_logs", True)
        kwargs.setdefault("container_logs", True)
        super().__init__(**kwargs)
        self.package, self.version, self.requested_version = package, version, version
        self.dataset, self.evaluation_dataset, self.env = dataset, evaluation_dataset, env or {}
        self.save_training_data, self.save_test_data = save_training_data, save_test_data
        self.aicenter_conn_id, self.launcher, self.python = aicenter_conn_id, launcher, python
        self.gpu, self.cpu, self.memory_gb, self.storage_gb = gpu, cpu, memory_gb, storage_gb
        self.dataset_volume_claim, self.dataset_sub_path = dataset_volume_claim, dataset_sub_path
        self.aws_secret_name, self.install_requirements = aws_secret_name, install_requirements
        self.allow_source_builds, self.incremental = allow_source_builds, incremental
        self.nodes, self.procs_per_node = nodes, procs_per_node
        self.checkpoint_interval, self.progress_interval = checkpoint_interval, progress_interval
        self.promote_to, self.promote_if = promote_to, promote_if
        checked = check_arguments(self.plan, type(self).__name__, self, approval_timeout=approval_timeout,
                                  queue_name=queue_name, startup_timeout=startup_timeout)
        self.gpu, self.checkpoint_interval, self.progress_interval = (checked.gpu, checked.checkpoint_interval,
                                                                       checked.progress_interval)
        self.approval_timeout, self.queue_name = checked.approval_timeout, checked.queue_name
        self.startup_timeout = checked.startup_timeout
        if dataset_volume_claim and not dataset:  # records and _results.json name a mounted claim pvc://<claim>/<sub_path>
            self.dataset = pvc_uri(dataset_volume_claim, dataset_sub_path)
        self.outlets, self.inlets = package_asset.declare(self.plan.makes_version, package, self.outlets, self.inlets)
        self.callbacks = [*self.callbacks, RunCallbacks]
        self.launcher_in_use: Launcher | None = None
        self.completion: Completion | None = None

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """A mapped task declares its outlet here: its ``__init__`` runs only after unmapping, in the worker.

        Airflow registers the assets a DAG declares when it is parsed and drops events for any
        other ("inactive assets"): 8 mapped trainings made 8 versions and no event.
        """
        outlets, inlets = package_asset.declare(cls.plan.makes_version, kwargs.get("package"), kwargs.get("outlets"),
                                                kwargs.get("inlets"))
        kwargs.update({k: v for k, v in (("outlets", outlets), ("inlets", inlets)) if v})
        return super().partial(**kwargs)

    # -- the hook, the launcher ---------------------------------------------------------
    @cached_property
    def aicenter_hook(self) -> AICenterHook:
        return AICenterHook(self.aicenter_conn_id)

    def launcher_name(self) -> str:
        return self.launcher or self.aicenter_hook.settings.launcher

    def run_launcher(self, name: str | None = None) -> Launcher:
        """This execution's launcher, built on first use (``execute``, a deferrable re-entry, or KPO's pod build)."""
        if self.launcher_in_use is None:
            self.launcher_in_use = self.make_launcher(name or self.launcher_name())
        return self.launcher_in_use

    def make_launcher(self, name: str) -> Launcher:
        """The launcher for this run (override to add one): :func:`.launch.make_launcher`."""
        return launch.make_launcher(self, name, self.run_request(), self.aicenter_hook)

    # -- the one flow --------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        """Prepare (refusals recorded, failing once), launch, then publish what the post-run step returns."""
        hook, request, run = self.aicenter_hook, self.run_request(), self.run_ref(context)
        self.launcher_in_use = None  # each execution builds its own
        check_inputs = partial(check_datasets, self.plan, request.datasets(), type(self).__name__, open_store=hook.get_store,
                               mounted_claim=bool(self.dataset_volume_claim),
                               allowed_roots=hook.settings.extra.get("allowed_dataset_roots"))
        with fail_once():
            ready = run_spec.prepare(hook.registry, request, run, launcher=self.run_launcher, check_inputs=check_inputs,
                                     extra=hook.settings.extra, log=self.log)
            finished = launch.start(context, ready, partial(super().execute, context))
        return self.complete(context, finished)

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        """Deferrable re-entry (pod or Job): KPO's own re-entry for a pod, then the same post-run step."""
        kpo_reentry = partial(super().trigger_reentry, context, event)
        return self.complete(context, launch.resume(context, self.run_launcher("kubernetes"), event, kpo_reentry))

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """KubernetesPodOperator's pod, with the runtime container, volumes, resources and security added."""
        settings = self.aicenter_hook.settings
        if self.namespace is None and settings.namespace and not template_namespace(self):
            self.namespace = settings.namespace
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        launcher = self.run_launcher("kubernetes")
        if not isinstance(launcher, PodLauncher):  # a pod asked for outside a pod run (KPO's dry_run)
            launcher = self.make_launcher("kubernetes")
            assert isinstance(launcher, PodLauncher)
        return launcher.shape_pod(pod)

    def get_or_create_pod(self, pod_request_obj: k8s.V1Pod, context: Context) -> k8s.V1Pod:
        """KPO's reattach, refusing a pod that does not run this very task (#39096)."""
        pod = super().get_or_create_pod(pod_request_obj, context)
        launcher = self.launcher_in_use
        if isinstance(launcher, PodLauncher):
            launcher.adopt(pod)
            if launcher.killed.is_set():  # on_kill came while the pod was created, when there was no pod to delete
                self.pod = pod
                super().on_kill()
                launcher.ending(None)  # killed: raises the run's RunError
        return pod

    def defer(self, *, trigger: BaseTrigger, method_name: str, kwargs: dict[str, Any] | None = None,
              timeout: timedelta | int | float | None = None) -> NoReturn:
        """Every deferral: KubernetesPodOperator's pod trigger becomes :class:`~airflow_aicenter.triggers.pod.RunPodTrigger`
        (the same wait, whose on_kill also revokes the run's credentials and records it killed)."""
        from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

        from airflow_aicenter.triggers.pod import RunPodTrigger

        launcher = self.launcher_in_use
        if type(trigger) is KubernetesPodTrigger and isinstance(launcher, PodLauncher):
            run = launcher.pod_run.run if launcher.pod_run is not None else None
            trigger = RunPodTrigger.replacing(trigger, aicenter_conn_id=self.aicenter_conn_id,
                                              credentials_secret=launcher.credentials_secret_of(run))
        super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def on_kill(self) -> None:
        """KPO deletes the pod (a pod run, or nothing started yet); the launcher then records the run as killed."""
        launcher = self.launcher_in_use
        if isinstance(launcher, PodLauncher):
            launcher.stopping()  # before the pod goes: the wait that sees it go ends the run killed, not failed
        if launcher is None or (isinstance(launcher, PodLauncher) and launcher.runs_in_operator):
            super().on_kill()
        if launcher is not None:
            launcher.kill()

    # -- before compute -------------------------------------------------------------------
    def run_ref(self, context: Context) -> RunRef:
        """This task try's run folder and who or what started its DAG run (:func:`airflow_aicenter.run_spec.run_ref`)."""
        return run_spec.run_ref(context["ti"], self.aicenter_hook.get_store(), context.get("dag_run"))

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Render, then mask secrets and show what the run will use, before Airflow stores the rendered fields.

        Airflow's own masker knows a fixed list of names (token, password, ...), not ``*key*`` or
        ``*credential*``: secret-looking ``env`` values are registered with it here. On the local
        launcher the Kubernetes fields mean nothing and are left out of the Rendered Templates
        view; ``version`` shows the version that will run, not ``"latest"``.
        """
        super().render_template_fields(context, jinja_env)
        from airflow.sdk.log import mask_secret

        with fail_once():  # a templated count (a DAG param) is known, and checked, only now
            self.nodes, self.procs_per_node = check_rendered_counts(self.plan, type(self).__name__, self)
        for value in self.run_request().redactor.values:
            for form in sorted(forms(value)):  # every form; no name: Airflow keeps a named value only if on its list
                mask_secret(form)
        self.requested_version = self.version
        try:
            if self.launcher_name() == "local":
                self.template_fields = AICENTER_TEMPLATE_FIELDS
            self.version = self.aicenter_hook.registry.resolve(self.package, str(self.version)).version
        except AICenterError:
            pass  # execute() reports it, and records the refused run

    def build_spec(self, parent: VersionRecord, run: RunRef) -> RunSpec:
        """The run's spec (see :func:`airflow_aicenter.run_spec.build_spec`): ``parent`` run in ``run``'s folder."""
        store, extra = self.aicenter_hook.get_store(), self.aicenter_hook.settings.extra
        return run_spec.build_spec(self.run_request(), parent, run, storage=store.uri, extra=extra)

    def spec_extra(self) -> dict[str, Any]:
        """More RunSpec fields of a pipeline type (prediction's input type)."""
        return {}

    def run_request(self) -> RunRequest:
        """The rendered arguments as one value (:func:`airflow_aicenter.run_spec.run_request`)."""
        from airflow.sdk.log import redact as airflow_redact

        # Values Airflow's masker knows (a templated Variable or Connection field) are secret under any name.
        secret_keys = frozenset(k for k, v in self.env.items() if airflow_redact(str(v)) != str(v))
        return run_spec.run_request(self.plan, self, secret_keys=secret_keys, spec_extra=self.spec_extra())

    # -- after the run: completion.py's one value, published --------------------------------
    def complete(self, context: Context, finished: Finished) -> dict[str, Any]:
        """Every launcher path ends here (local, pod sync and deferrable, Job, a recovered earlier try).

        :meth:`PostRun.complete <airflow_aicenter.completion.PostRun.complete>` registers, promotes
        and writes ``_results.json``; its value is published: XCom, the Asset event. Safe to repeat.
        """
        from airflow.sdk.exceptions import AirflowSkipException

        if finished.outcome.status == "skipped":
            raise AirflowSkipException(finished.outcome.skipped or "the runtime found nothing to do")
        post = PostRun(self.aicenter_hook.registry, self.run_request(), self.log)
        # The run's page, as the extra link builds it: the folder may be an earlier try's (a recovered run).
        done = self.completion = post.complete(finished.run, finished.outcome, finished.spec.version, run_page_url(finished.run))
        context["ti"].xcom_push(key="return_value", value=done.value)
        if self.promote_if == "approved" and done.promotion is not None:
            self.ask_approval(context, done, finished.run)  # waits (raises) while a person decides
        package_asset.publish(context, self.package, self.outlets, done.event)
        return done.value

    # -- promote_if="approved": a person decides (airflow_aicenter.approval) ---------------------
    def ask_approval(self, context: Context, done: Completion, run: RunRef) -> None:
        """Keep the candidate's pending approval and ask a person; returns only when there is nothing to ask."""
        ti = context["ti"]
        asking = approval.open_request(self.aicenter_hook.registry, self.run_request(), done, run, run_page_url,
                                       approval.required_actions_url(_base_url(), ti))
        if asking is not None:
            approval.ask(ti_id=ti.id, pending=asking[0], body=asking[1], timeout=self.approval_timeout,
                         method_name="approval_complete", kwargs={"value": done.value, "asset_event": done.event},
                         defer=self.defer, log=self.log)

    def approval_complete(
        self, context: Context, event: dict[str, Any], value: dict[str, Any], asset_event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The person's answer (or the timeout): keep the decision, move the alias if approved, publish."""
        decided = approval.settle(self.aicenter_hook.registry, value, str(self.promote_to), event, self.approval_timeout,
                                  self.log)
        package_asset.publish(context, self.package, self.outlets, asset_event)
        return decided

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: inputs = the datasets and the parent version; outputs = the new version and its snapshot."""
        return operator_lineage(*lineage(self.run_request(), self.completion, OPENLINEAGE_NAMESPACE))
