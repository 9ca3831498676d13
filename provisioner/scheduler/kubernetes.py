"""Kubernetes: cordon, evict and uncordon nodes through the official ``kubernetes`` client.

:meth:`Kubernetes.drain` does what ``kubectl drain --ignore-daemonsets --delete-emptydir-data``
does, one step at a time and never blocking for long:

1. one JSON merge patch cordons the node (``spec.unschedulable: true``) and records the reason
   in the annotation :data:`REASON_ANNOTATION`;
2. every pod on the node that counts as workload is evicted through the policy/v1 Eviction
   API, so PodDisruptionBudgets are honoured. DaemonSet pods, mirror (static) pods and pods
   that have ended (``Succeeded``/``Failed``) do not count and are left alone. Pods no
   controller owns are evicted too (as ``kubectl drain --force`` would); nothing recreates them.

An eviction a PodDisruptionBudget forbids for now (429 TooManyRequests) is no error: the pod
stays, the node is not idle, and the next :meth:`~Kubernetes.is_idle` retries it, as long as
the node is still cordoned with our annotation. A pod already gone (404) is fine; a pod being
deleted (``deletionTimestamp`` set) still counts until it is gone but is not evicted again.
The evictions of one call stop after ``eviction_timeout`` seconds; the rest wait for the next.

:meth:`~Kubernetes.resume` uncordons the node and removes the annotation (merge patch, null).
Every failure is a :class:`SchedulerError`: an unknown node, a refused permission (401/403),
an API server that does not answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

import urllib3
from kubernetes import client, config

from provisioner.scheduler.base import NodeStatus, SchedulerError

REASON_ANNOTATION = "provisioner.io/drain-reason"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
MERGE_PATCH = "application/merge-patch+json"
_ENDED = ("Succeeded", "Failed")
# What the connection layer raises when the API server does not answer (refused, reset,
# timed out, TLS failure); the client lets urllib3's errors through unwrapped.
_UNANSWERED = (urllib3.exceptions.HTTPError, OSError)

T = TypeVar("T")


def counts_as_workload(pod: client.V1Pod) -> bool:
    """Whether ``pod`` keeps a node busy: not a DaemonSet or mirror pod, and not ended."""
    if pod.status is not None and pod.status.phase in _ENDED:
        return False
    meta = pod.metadata or client.V1ObjectMeta()
    if MIRROR_ANNOTATION in (meta.annotations or {}):
        return False
    return not any(ref.kind == "DaemonSet" for ref in meta.owner_references or [])


def node_state(node: client.V1Node) -> str:
    """kubectl's STATUS column: ``Ready`` when the Ready condition is True, ``NotReady`` when
    it is False or Unknown (kubelet silent), ``Unknown`` with no Ready condition; then
    ``,SchedulingDisabled`` when cordoned."""
    ready = "Unknown"
    conditions = node.status.conditions if node.status is not None else None
    for condition in conditions or []:
        if condition.type == "Ready":
            ready = "Ready" if condition.status == "True" else "NotReady"
    return f"{ready},SchedulingDisabled" if _cordoned(node) else ready


def _cordoned(node: client.V1Node) -> bool:
    return bool(node.spec is not None and node.spec.unschedulable)


def _reason(node: client.V1Node) -> str | None:
    annotations = (node.metadata.annotations if node.metadata is not None else None) or {}
    reason = annotations.get(REASON_ANNOTATION)
    return str(reason) if reason is not None else None


def _message(exc: client.ApiException) -> str:
    """The message of the Status the API server answered with, else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}".strip()


def _load_client(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    """A client from ``kubeconfig`` (else in-cluster, else the default kubeconfig)."""
    configuration = client.Configuration()
    # A connection that fails is tried once more, so a call lasts at most twice its timeout.
    configuration.retries = 1
    try:
        if kubeconfig is None and context is None:
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                return client.ApiClient(configuration)
            except config.ConfigException:
                pass  # not in a pod: the default kubeconfig
        # kubernetes.config has no type hints, unlike kubernetes.client.
        loaded: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
        return loaded
    except (config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = kubeconfig or "the default kubeconfig (~/.kube/config, $KUBECONFIG)"
        raise SchedulerError(f"kubernetes: cannot load {where}: {exc}") from exc


class Kubernetes:
    """``scheduler: {type: kubernetes}``: cordon and evict, then uncordon."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: client.ApiClient | None = None,
        eviction_timeout: float = 60.0,
        request_timeout: float = 30.0,
    ) -> None:
        self._api = api_client if api_client is not None else _load_client(kubeconfig, context)
        self._core = client.CoreV1Api(self._api)
        self._eviction_timeout = eviction_timeout
        self._request_timeout = request_timeout

    def drain(self, node: str, reason: str) -> None:
        patch = {
            "spec": {"unschedulable": True},
            "metadata": {"annotations": {REASON_ANNOTATION: reason}},
        }
        self._patch(node, patch, "cordon")
        self._evict(node, [pod for pod in self._pods(node) if counts_as_workload(pod)])

    def is_idle(self, node: str) -> bool:
        """Whether no workload pod runs on ``node``; on a node we cordoned, evicts them again
        (a PodDisruptionBudget may allow now what it refused before)."""
        current = self._node(node)
        workload = [pod for pod in self._pods(node) if counts_as_workload(pod)]
        if workload and _cordoned(current) and _reason(current) is not None:
            self._evict(node, workload)
        return not workload

    def resume(self, node: str) -> None:
        patch = {
            "spec": {"unschedulable": False},
            "metadata": {"annotations": {REASON_ANNOTATION: None}},
        }
        self._patch(node, patch, "uncordon")

    def status(self, node: str) -> NodeStatus:
        current = self._node(node)
        drained = _cordoned(current)
        return NodeStatus(
            name=node,
            drained=drained,
            idle=not any(counts_as_workload(pod) for pod in self._pods(node)),
            reason=_reason(current) if drained else None,
            state=node_state(current),
        )

    # -- the API calls, each mapped to SchedulerError --------------------------------------

    def _node(self, node: str) -> client.V1Node:
        return self._call(
            f"read node {node}",
            node,
            lambda: self._core.read_node(node, _request_timeout=self._request_timeout),
        )

    def _patch(self, node: str, patch: dict[str, object], doing: str) -> None:
        self._call(
            f"{doing} node {node}",
            node,
            lambda: self._core.patch_node(
                node, patch, _content_type=MERGE_PATCH, _request_timeout=self._request_timeout
            ),
        )

    def _pods(self, node: str) -> list[client.V1Pod]:
        pods = self._call(
            f"list the pods on node {node}",
            None,
            lambda: self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}", _request_timeout=self._request_timeout
            ),
        )
        return list(pods.items or [])

    def _evict(self, node: str, pods: list[client.V1Pod]) -> None:
        """Ask for the eviction of each pod not already being deleted; 404 and 429 are fine."""
        deadline = time.monotonic() + self._eviction_timeout
        for pod in pods:
            meta = pod.metadata or client.V1ObjectMeta()
            if meta.deletion_timestamp is not None:
                continue
            if time.monotonic() >= deadline:
                return  # the rest on the next call
            self._evict_one(node, str(meta.name), str(meta.namespace))

    def _evict_one(self, node: str, name: str, namespace: str) -> None:
        eviction = client.V1Eviction(
            api_version="policy/v1",
            kind="Eviction",
            metadata=client.V1ObjectMeta(name=name, namespace=namespace),
        )

        def evict() -> None:
            try:
                self._core.create_namespaced_pod_eviction(
                    name,
                    namespace,
                    eviction,
                    # The client sends this POST with no Content-Type (the API server then
                    # assumes JSON); name it, for proxies in front of the API server.
                    _headers={"Content-Type": "application/json"},
                    _request_timeout=self._request_timeout,
                )
            except client.ApiException as exc:
                if exc.status not in (404, 429):  # gone; a disruption budget says not now
                    raise

        self._call(f"evict pod {namespace}/{name} from node {node}", None, evict)

    def _call(self, doing: str, node: str | None, call: Callable[[], T]) -> T:
        """``call()``, its failures turned into a SchedulerError that says what to do;
        a 404 means that ``node`` (when given) does not exist."""
        host = self._api.configuration.host
        try:
            return call()
        except client.ApiException as exc:
            if exc.status == 0:  # the client's own wrapping of a TLS failure
                raise SchedulerError(f"kubernetes: API server {host}: {exc.reason}") from exc
            if exc.status == 404 and node is not None:
                raise SchedulerError(f"kubernetes: no node {node}") from exc
            if exc.status == 401:
                raise SchedulerError(
                    f"kubernetes: API server {host} refused our credentials (401 Unauthorized)"
                    f" to {doing}: check the kubeconfig's user (token or certificate)"
                ) from exc
            if exc.status == 403:
                raise SchedulerError(
                    f"kubernetes: not permitted to {doing}: {_message(exc)} (draining needs"
                    " get/patch on nodes, list on pods, create on pods/eviction)"
                ) from exc
            raise SchedulerError(f"kubernetes: cannot {doing}: {_message(exc)}") from exc
        except _UNANSWERED as exc:
            raise SchedulerError(
                f"kubernetes: the API server {host} did not answer (to {doing}): {exc}"
            ) from exc
        except (client.OpenApiException, ValueError) as exc:
            raise SchedulerError(
                f"kubernetes: unreadable answer from API server {host} (to {doing}): {exc}"
            ) from exc
