"""A rendered pod spec run with `docker run`, honouring what the kubelet would: image, command and args, env, the
container and pod securityContext, CPU request and memory limit, volumes (ConfigMaps as read-only files, emptyDirs as
tmpfs), probes run in the container with `docker exec`, the preStop sleep and terminationGracePeriodSeconds.

A pod has its own network namespace and the same port as every other pod; here every pod shares the host's
loopback, so each gets its own port: `--port`/`--host` in the args and the pool Service URLs in the pool map are
the only things rewritten, to that port on 127.0.0.1."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.container.docker import Container

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T|m)?$")
_FACTORS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6,
            "G": 10**9, "T": 10**12, "m": 1e-3}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("8Gi", "500m", "2") as a number."""
    found = _QUANTITY.match(str(text))
    assert found, f"unreadable quantity {text!r}"
    return float(found.group(1)) * _FACTORS[found.group(2)]


def resource_field(container: dict[str, Any], ref: dict[str, Any]) -> int:
    """A `resourceFieldRef` as the kubelet resolves it: `requests.cpu` or `limits.memory` of this container, divided
    by the divisor and rounded up (a request that is not set is the limit, as Kubernetes defaults it)."""
    assert ref.get("containerName", container["name"]) == container["name"], ref
    kind, resource = ref["resource"].split(".", 1)
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(resource, resources.get("limits", {}).get(resource))
    assert value is not None, f"{ref['resource']} is not set on the container"
    return math.ceil(quantity(value) / quantity(ref.get("divisor", 1)))


@dataclass
class PodPlan:
    """What `docker run` gets for one rendered Deployment, and what the kubelet would do around it."""

    name: str
    docker_args: list[str]
    image: str
    args: list[str]
    port: int
    probes: dict[str, dict[str, Any]]
    pre_stop_sleep_s: int
    grace_s: int

    def start(self) -> Container:
        return Container.start(self.docker_args, self.image, self.args, prefix=f"sie-test-{self.name}")

    def probe(self, container: Container, kind: str) -> bool:
        """The rendered httpGet probe, run in the container as the kubelet runs it against the pod: success is a
        status from 200 to 399 within timeoutSeconds (urllib raises on 400 and above)."""
        spec = self.probes[kind]
        get = spec["httpGet"]
        port = self.port if get["port"] in ("http", 8080) else int(get["port"])
        timeout = spec.get("timeoutSeconds", 1)
        code = (f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}{get['path']}', "
                f"timeout={timeout}).close()")
        return container.exec("python3", "-c", code, timeout=timeout + 30).returncode == 0

    def wait_started(self, container: Container, limit_s: float = 600) -> float:
        """Runs the startup probe until it passes, as often as once a second, for at most what the rendered probe
        allows (periodSeconds x failureThreshold, capped at limit_s); seconds taken."""
        spec = self.probes["startup"]
        allowed = min(spec["periodSeconds"] * spec["failureThreshold"], limit_s)
        started = time.monotonic()
        while not self.probe(container, "startup"):
            if not container.running():
                raise AssertionError(f"{self.name} exited while starting:\n{container.logs()[-4000:]}")
            if time.monotonic() - started > allowed:
                raise AssertionError(f"{self.name}: startup probe failing after {allowed:g} s:\n"
                                     f"{container.logs()[-4000:]}")
            time.sleep(1)
        return time.monotonic() - started

    def terminate(self, container: Container) -> tuple[float, int]:
        """As the kubelet deletes a pod: the preStop sleep action (the pod still serves meanwhile), then SIGTERM and
        SIGKILL once terminationGracePeriodSeconds, counted from the start of preStop, is spent. (seconds, exit code)"""
        started = time.monotonic()
        time.sleep(self.pre_stop_sleep_s)
        _, code = container.stop(grace_s=self.grace_s - self.pre_stop_sleep_s)
        return time.monotonic() - started, code


def configmap_files(configmap: dict[str, Any], folder: Path) -> Path:
    """The ConfigMap's data as files, the way its volume shows them."""
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    for key, text in configmap.get("data", {}).items():
        (folder / key).write_text(text)
        (folder / key).chmod(0o644)
    return folder


def plan(deployment: dict[str, Any], configmaps: dict[str, dict[str, Any]], port: int, ports: dict[str, int],
         folder: Path) -> PodPlan:
    """The docker run of `deployment`'s one container, on `port`. `ports` maps each pool Service host (as it appears
    in the pool map) to the loopback port of the pod standing in for it."""
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    name = deployment["metadata"]["name"]
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    user = csc.get("runAsUser", psc.get("runAsUser"))
    group = csc.get("runAsGroup", psc.get("runAsGroup", user))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        assert user not in (None, 0), "runAsNonRoot without a non-root runAsUser"
    argv = ["--network", "host", "--user", f"{user}:{group}"]
    if "fsGroup" in psc:
        argv += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    for cap in csc.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", cap]
    for cap in csc.get("capabilities", {}).get("add", []):
        argv += ["--cap-add", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    resources = c.get("resources", {})
    if "memory" in resources.get("limits", {}):
        argv += ["--memory", str(int(quantity(resources["limits"]["memory"])))]
    if "cpu" in resources.get("limits", {}):
        argv += ["--cpus", str(quantity(resources["limits"]["cpu"]))]
    if "cpu" in resources.get("requests", {}):  # the kubelet turns a CPU request into cgroup CPU shares
        argv += ["--cpu-shares", str(int(quantity(resources["requests"]["cpu"]) * 1024))]
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("resourceFieldRef")
        if ref is not None:  # the kubelet's downward API: the container's own request or limit
            argv += ["-e", f"{e['name']}={resource_field(c, ref)}"]
            continue
        assert "value" in e, f"env {e['name']} comes from {e.get('valueFrom')}: give these values no secret"
        argv += ["-e", f"{e['name']}={e['value']}"]

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:  # ConfigMap volumes are read-only whatever the mount says
            source = configmap_files(configmaps[volume["configMap"]["name"]], folder / name / mount["name"])
            if source.joinpath("pools.json").exists():
                source.joinpath("pools.json").write_text(loopback_pool_map(source.joinpath("pools.json"), ports))
            argv += ["-v", f"{source}:{mount['mountPath']}:ro"]
        elif "emptyDir" in volume:
            # as the kubelet makes an emptyDir: mode 0777, and with an fsGroup owned by it and setgid. (Docker gives
            # a tmpfs over a folder of the image that folder's mode instead: the image's cache folder is 1777.)
            size, fs_group = volume["emptyDir"].get("sizeLimit"), psc.get("fsGroup")
            options = ["rw", *([f"mode=2777,gid={fs_group}"] if fs_group is not None else ["mode=0777"]),
                       *([f"size={int(quantity(size))}"] if size else [])]
            argv += ["--tmpfs", f"{mount['mountPath']}:{','.join(options)}"]
        else:
            raise AssertionError(f"volume {mount['name']} is neither a ConfigMap nor an emptyDir: {volume}")

    command = c["command"]
    argv += ["--entrypoint", command[0]]
    args = [*command[1:], *c.get("args", [])]
    (http,) = [p for p in c["ports"] if p["name"] == "http"]
    assert args[args.index("--port") + 1] == str(http["containerPort"]), "the server listens where the Service sends"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    probes = {kind: c[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
    return PodPlan(name=name, docker_args=argv, image=c["image"], args=args, port=port, probes=probes,
                   pre_stop_sleep_s=int(c["lifecycle"]["preStop"]["sleep"]["seconds"]),
                   grace_s=int(pod["terminationGracePeriodSeconds"]))


def loopback_pool_map(path: Path, ports: dict[str, int]) -> str:
    """The rendered pool map with each pool Service URL replaced by its stand-in pod's loopback URL."""
    rendered = json.loads(path.read_text())
    out = {}
    for model, url in rendered.items():
        host = re.match(r"^http://([^:/]+)", url)
        assert host and host.group(1) in ports, f"pool URL {url} names no pod of this run"
        out[model] = f"http://127.0.0.1:{ports[host.group(1)]}"
    return json.dumps(out)
