"""The Kubernetes scheduler adapter, through the official client, against recorded exchanges.

No API server can run here, so each test plays a scenario of ``tests/data/kubernetes/`` on a
replay server (tests/peers/kubeapi.py) and asserts on what the client sent it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from provisioner.scheduler.base import NodeStatus, Scheduler, SchedulerError
from provisioner.scheduler.kubernetes import REASON_ANNOTATION, Kubernetes
from tests.peers import dead_tcp_port
from tests.peers.kubeapi import Received, ReplayApiServer, replay

REASON = "provisioner run 20250612-0930-ab12: driver 570.133.20 -> 580.65.06"
MERGE_PATCH = "application/merge-patch+json"


def api_client(url: str) -> client.ApiClient:
    configuration = client.Configuration(host=url)
    configuration.retries = 0  # a refused connection fails at once
    return client.ApiClient(configuration)


Play = Callable[..., tuple[ReplayApiServer, Kubernetes]]


@pytest.fixture
def play() -> Iterator[Play]:
    """``play(scenario, eviction_timeout=60)``: a replay server for the scenario and a
    Kubernetes scheduler whose client talks to it; both are closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(
            scenario: str, eviction_timeout: float = 60
        ) -> tuple[ReplayApiServer, Kubernetes]:
            server = stack.enter_context(replay(scenario))
            api = api_client(server.url)
            stack.callback(api.close)
            return server, Kubernetes(
                api_client=api, eviction_timeout=eviction_timeout, request_timeout=5
            )

        yield start


def evictions(server: ReplayApiServer) -> list[str]:
    return [r.path for r in server.received if r.method == "POST"]


def test_drain_cordons_then_evicts_only_workload_pods(play: Play) -> None:
    server, kube = play("drain")
    kube.drain("gpu-01", REASON)
    server.assert_complete()
    cordon: Received = server.received[0]
    assert (cordon.method, cordon.path, cordon.content_type) == (
        "PATCH",
        "/api/v1/nodes/gpu-01",
        MERGE_PATCH,
    )
    assert cordon.body == {
        "spec": {"unschedulable": True},
        "metadata": {"annotations": {REASON_ANNOTATION: REASON}},
    }
    assert server.received[1].query == {"fieldSelector": ["spec.nodeName=gpu-01"]}
    # The DaemonSet pods (kube-proxy, dcgm-exporter), the nginx-proxy mirror pod and the
    # Succeeded job pod are never evicted; the 404 of a pod already gone is no error.
    assert evictions(server) == [
        "/api/v1/namespaces/batch/pods/resize-images-29160540-kq2vd/eviction",
        "/api/v1/namespaces/ml/pods/train-llama-8b-6d9f7c5b8-x2k9q/eviction",
    ]
    assert server.received[-1].body == {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "train-llama-8b-6d9f7c5b8-x2k9q", "namespace": "ml"},
    }


def test_a_disruption_budget_429_keeps_the_node_busy_until_a_later_eviction(
    play: Play,
) -> None:
    server, kube = play("pdb")
    vllm = "/api/v1/namespaces/inference/pods/vllm-7c9d8f6b5d-qp4zt/eviction"
    train = "/api/v1/namespaces/ml/pods/train-llama-8b-6d9f7c5b8-x2k9q/eviction"

    kube.drain("gpu-02", REASON)  # vllm refused (429): no error
    assert evictions(server) == [vllm, train]
    assert kube.is_idle("gpu-02") is False  # refused again; terminating train pod not re-evicted
    assert evictions(server) == [vllm, train, vllm]
    assert kube.is_idle("gpu-02") is False  # the budget allows it now: evicted
    assert evictions(server) == [vllm, train, vllm, vllm]
    assert kube.is_idle("gpu-02") is True  # only the dcgm-exporter DaemonSet pod is left
    server.assert_complete()


def test_resume_uncordons_and_removes_the_annotation(play: Play) -> None:
    server, kube = play("resume")
    kube.resume("gpu-01")
    server.assert_complete()
    (patch,) = server.received
    assert (patch.method, patch.path, patch.content_type) == (
        "PATCH",
        "/api/v1/nodes/gpu-01",
        MERGE_PATCH,
    )
    # JSON merge patch (RFC 7386): null deletes the annotation.
    assert patch.body == {
        "spec": {"unschedulable": False},
        "metadata": {"annotations": {REASON_ANNOTATION: None}},
    }


def test_status_reports_cordon_reason_readiness_and_workload(play: Play) -> None:
    server, kube = play("status")
    assert kube.status("gpu-03") == NodeStatus(
        name="gpu-03",
        drained=True,
        idle=False,
        reason=REASON,
        state="Ready,SchedulingDisabled",
    )
    # Ready condition Unknown (kubelet silent) reads NotReady, as in kubectl get nodes.
    assert kube.status("gpu-04") == NodeStatus(
        name="gpu-04", drained=False, idle=True, reason=None, state="NotReady"
    )
    server.assert_complete()
    assert all(r.method == "GET" for r in server.received)  # status changes nothing


def test_an_unknown_node_is_a_scheduler_error(play: Play) -> None:
    server, kube = play("unknown_node")
    with pytest.raises(SchedulerError, match=r"^kubernetes: no node gpu-99$"):
        kube.is_idle("gpu-99")
    with pytest.raises(SchedulerError, match=r"^kubernetes: no node gpu-99$"):
        kube.drain("gpu-99", REASON)
    server.assert_complete()


def test_refused_credentials_and_permissions_are_scheduler_errors(play: Play) -> None:
    server, kube = play("refused")
    with pytest.raises(SchedulerError, match=r"refused our credentials \(401 Unauthorized\)"):
        kube.status("gpu-01")
    with pytest.raises(
        SchedulerError, match=r"not permitted to cordon node gpu-01: .*cannot patch"
    ):
        kube.drain("gpu-01", REASON)
    with pytest.raises(
        SchedulerError,
        match=r"not permitted to evict pod ml/train-llama-8b-6d9f7c5b8-x2k9q from node gpu-02: "
        r'.*cannot create resource "pods/eviction"',
    ):
        kube.drain("gpu-02", REASON)
    server.assert_complete()


def test_a_server_that_does_not_answer_is_a_scheduler_error_at_once() -> None:
    with dead_tcp_port() as port:
        api = api_client(f"http://127.0.0.1:{port}")
        kube = Kubernetes(api_client=api, request_timeout=2)
        started = time.monotonic()
        try:
            for call in (lambda: kube.is_idle("gpu-01"), lambda: kube.resume("gpu-01")):
                with pytest.raises(SchedulerError, match=r"did not answer") as caught:
                    call()
                assert not isinstance(caught.value.__cause__, SchedulerError)
        finally:
            api.close()
    assert time.monotonic() - started < 5


def test_a_server_that_accepts_but_never_answers_times_out_as_a_scheduler_error() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog; nothing ever reads them
        api = api_client(f"http://127.0.0.1:{silent.getsockname()[1]}")
        kube = Kubernetes(api_client=api, request_timeout=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(SchedulerError, match=r"did not answer \(to read node gpu-01\)"):
                kube.status("gpu-01")
        finally:
            api.close()
    assert time.monotonic() - started < 3


def test_eviction_timeout_leaves_the_evictions_to_the_next_call(play: Play) -> None:
    server, kube = play("drain", eviction_timeout=0)
    kube.drain("gpu-01", REASON)
    assert server.mismatches == []
    assert evictions(server) == []  # cordoned and listed, then out of time
    assert [item.method for item in server.remaining] == ["POST", "POST"]


def test_a_kubeconfig_file_reaches_the_server_with_its_token(tmp_path: Path) -> None:
    with replay("status") as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(  # JSON is YAML
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "lab", "cluster": {"server": server.url}}],
                    "users": [{"name": "provisioner", "user": {"token": "t0ken-from-kubeconfig"}}],
                    "contexts": [
                        {"name": "other", "context": {"cluster": "nowhere", "user": "nobody"}},
                        {"name": "lab", "context": {"cluster": "lab", "user": "provisioner"}},
                    ],
                    "current-context": "other",
                }
            )
        )
        kube: Scheduler = Kubernetes(kubeconfig=str(kubeconfig), context="lab")
        assert kube.status("gpu-03").drained is True
        assert kube.status("gpu-04").state == "NotReady"
        server.assert_complete()
        assert {r.authorization for r in server.received} == {"Bearer t0ken-from-kubeconfig"}


def test_a_missing_kubeconfig_is_a_scheduler_error(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match=r"kubernetes: cannot load .*absent"):
        Kubernetes(kubeconfig=str(tmp_path / "absent"))
