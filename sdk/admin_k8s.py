"""Kubernetes discovery for `sie-admin`: the Running router pods of a label selector, reached through the API server's
pod proxy. The `kubernetes` client is optional and heavy, so it is imported only when a command needs it."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from sie_sdk.admin import AdminError, Target

# The API server strips `Authorization` (it authenticated the caller with it), so the admin token travels here.
ADMIN_TOKEN_HEADER = "X-SIE-Admin-Token"


def api_client(kubeconfig: str | None, context: str | None) -> Any:
    """An ApiClient from the kubeconfig, or from the pod's service account when running in a cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as exc:
        raise AdminError(f"no usable Kubernetes configuration: {exc}") from exc


def running_pods(api: Any, namespace: str, selector: str, timeout_s: float) -> list[str]:
    """Names of the pods that match the selector, are Running and are not being deleted, sorted."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector,
                                                            _request_timeout=timeout_s)
    except ApiException as exc:
        raise AdminError(f"listing pods in namespace {namespace!r}: HTTP {exc.status} {exc.reason}") from exc
    except HTTPError as exc:
        raise AdminError(f"cannot reach the Kubernetes API at {api.configuration.host}: {exc}") from exc
    return sorted(pod.metadata.name for pod in pods.items
                  if pod.status and pod.status.phase == "Running" and not pod.metadata.deletion_timestamp)


def proxy_target(api: Any, namespace: str, pod: str, port: int, token: str | None, timeout_s: float) -> Target:
    """A Target whose requests go to `pod:port` through `/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy`."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    root = f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"

    def fetch(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json", **({ADMIN_TOKEN_HEADER: token} if token else {}),
                   **({"Content-Type": "application/json"} if body is not None else {})}
        request = api.param_serialize(method, root + path, header_params=headers, body=body,
                                      auth_settings=["BearerToken"])
        try:
            response = api.call_api(*request, _request_timeout=timeout_s)
            response.read()
        except (ApiException, HTTPError) as exc:
            raise AdminError(f"pod {pod}: cannot reach it through the Kubernetes API: {exc}") from exc
        return response.status, response.data or b""

    return Target(f"pod {pod}", fetch, pod=pod)


def discover(namespace: str, selector: str, *, port: int, kubeconfig: str | None, context: str | None,
             token: str | None, timeout_s: float, cleanup: ExitStack) -> list[Target]:
    """One Target per Running router pod (the client closes with `cleanup`); AdminError when none matches."""
    try:
        import kubernetes  # noqa: F401
    except ImportError as exc:
        raise AdminError("--namespace/--selector need the kubernetes client: pip install kubernetes") from exc
    api = api_client(kubeconfig, context)
    cleanup.callback(api.close)
    pods = running_pods(api, namespace, selector, timeout_s)
    if not pods:
        raise AdminError(f"no Running pod matches {selector!r} in namespace {namespace!r}")
    return [proxy_target(api, namespace, pod, port, token, timeout_s) for pod in pods]
