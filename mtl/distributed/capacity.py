"""What a Ray cluster has now and what it can grow to, and the decision that follows: GPU or CPU
workers, wait for the autoscaler, or fail at once.

The rule (README "Running on a cluster"):
  * A run that joins an existing cluster (``--address``, ``$RAY_ADDRESS``, ``ray job submit``)
    trains on GPUs unless told ``--no-use-gpu``: the autoscaler only adds GPU nodes when someone
    asks for GPUs, so looking at the GPUs present at submit time would put the first run of a
    freshly started cluster (GPU workers scaled to zero) on CPUs.
  * A Ray instance the run starts itself (local debugging) uses GPUs if this machine has any.
  * If the worker group fits now, or once the autoscaler adds the nodes its config allows, the
    run starts (waiting up to ``--start-timeout-s`` for nodes to boot). If it can never fit —
    no GPU anywhere and no GPU node type, too few CPUs on a fixed cluster — it fails at once
    with a message naming the flags that change that.

What the autoscaler can add is read from, in this order: Ray's cluster config in the GCS (what
Ray Train itself checks; published by autoscalers that report it), the cluster launcher's
``~/ray_bootstrap_config.yaml`` on the head node (`ray up`; jobs run on the head; Ray Tune
reads the same file), and on KubeRay the RayCluster resource (read the way KubeRay's autoscaler
reads it; the head pod's service account needs ``get`` on ``rayclusters``). None of them: a
fixed cluster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from mtl.errors import ClusterError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
RESOURCES = ("CPU", "GPU")
UNBOUNDED = 1 << 20
NO_CUDA_HINT = ("a CPU-only torch build, no NVIDIA driver on that node, or a driver older than the torch build's CUDA "
                "needs (torch's cu130 wheels, the tested set: driver 580 or newer; `nvidia-smi` shows it). Fix the "
                "node's image, or train on CPUs with --no-use-gpu.")


class InfeasibleCluster(ClusterError):
    """The worker group can never be placed on this cluster."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int  # the most nodes of this type the autoscaler keeps (its max_workers)


@dataclass(frozen=True)
class Autoscaling:
    """What an autoscaler config allows: worker node types, and the cap on worker nodes overall."""

    node_types: list[NodeType]
    max_nodes: int | None = None


@dataclass(frozen=True)
class Capacity:
    """Alive nodes' resources now, and what an autoscaler may grow the cluster to (None: there
    is one, but its config could not be read; no node types: a fixed cluster)."""

    nodes: list[dict[str, float]]
    autoscaling: Autoscaling | None
    source: str

    @property
    def totals(self) -> dict[str, float]:
        return {k: sum(n.get(k, 0) for n in self.nodes) for k in RESOURCES}

    def max_fit(self, bundle: dict[str, float]) -> int | None:
        """How many ``bundle``s fit once the cluster has grown as far as its config allows (an
        upper bound; None: unknown). Alive nodes that look like a worker type count within that
        type's maximum, not on top of it."""
        if self.autoscaling is None:
            return None
        types, budget = self.autoscaling.node_types, self.autoscaling.max_nodes
        others = [n for n in self.nodes if not any(_is_of_type(n, t) for t in types)]
        total, budget = fits(others, bundle), UNBOUNDED if budget is None else budget
        for per_node, count in sorted(((fits([t.resources], bundle), t.max_count) for t in types), reverse=True):
            take = min(count, budget)
            total, budget = total + per_node * take, budget - take
        return max(total, fits(self.nodes, bundle))

    def can_add(self, resource: str) -> bool | None:
        if self.autoscaling is None:
            return None
        return any(t.resources.get(resource, 0) > 0 and t.max_count > 0 for t in self.autoscaling.node_types)

    def describe(self) -> str:
        now = ", ".join(f"{k} {self.totals.get(k, 0):g}" for k in RESOURCES)
        if self.autoscaling is None:
            return f"nodes now: {now}; {self.source}"
        types = "; ".join(f"{t.name} x{t.max_count} {_res(t.resources)}" for t in self.autoscaling.node_types) or "none"
        return f"nodes now: {now}; node types the autoscaler may add ({self.source}): {types}"


def _is_of_type(node: dict[str, float], t: NodeType) -> bool:
    return all(node.get(k, 0) == t.resources.get(k, 0) for k in RESOURCES)


def _res(r: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {r[k]:g}" for k in RESOURCES if r.get(k)) + "}"


def fits(nodes: list[dict[str, float]], bundle: dict[str, float]) -> int:
    """Bundles that fit on these nodes, each bundle on one node."""
    total = 0
    for node in nodes:
        per = [math.floor(node.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        total += min(per) if per else 0
    return total


def autoscaling_from_config(config: dict[str, Any]) -> Autoscaling:
    """Worker node types and the node cap of a Ray autoscaler config (the cluster launcher's
    YAML format; KubeRay's RayCluster is translated into it by Ray's own code)."""
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    types = [NodeType(name, {k: float(v) for k, v in (t.get("resources") or {}).items() if k in RESOURCES},
                      int(t.get("max_workers", cap or 0)))
             for name, t in (config.get("available_node_types") or {}).items() if name != head]
    return Autoscaling(types, None if cap is None else int(cap))


def _from_gcs() -> Autoscaling | None:
    import ray

    config = ray._private.state.state.get_cluster_config()  # what Ray Train's own resource check reads
    if config is None or not config.node_group_configs:
        return None
    return Autoscaling([NodeType(g.name, {k: float(g.resources.get(k, 0)) for k in RESOURCES},
                                 g.max_count if g.max_count >= 0 else UNBOUNDED) for g in config.node_group_configs])


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _from_bootstrap_file() -> Autoscaling | None:
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as fh:
        return autoscaling_from_config(yaml.safe_load(fh) or {})


def _pod_namespace() -> str | None:
    """The Kubernetes namespace of this pod (its service account's), else None. KubeRay before
    1.6 sets ``RAY_CLUSTER_NAMESPACE`` only in the autoscaler's container, not in the Ray one."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _from_kuberay() -> Autoscaling | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    namespace = os.environ.get("RAY_CLUSTER_NAMESPACE") or (_pod_namespace() if name else None)
    if not (name and namespace):
        return None
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    return autoscaling_from_config(AutoscalingConfigProducer(name, namespace)())


SOURCES: list[tuple[str, Callable[[], Autoscaling | None]]] = [
    ("Ray's cluster config", _from_gcs), (BOOTSTRAP_CONFIG, _from_bootstrap_file), ("the KubeRay RayCluster", _from_kuberay)]


def read_capacity() -> Capacity:
    """The connected cluster's capacity (call after ``ray.init``): the first source that answers;
    one that fails to read is noted and the next one tried."""
    import ray

    nodes = [{k: float(n["Resources"].get(k, 0)) for k in RESOURCES} for n in ray.nodes() if n.get("Alive")]
    failed = []
    for name, source in SOURCES:
        try:
            autoscaling = source()
        except Exception as e:  # noqa: BLE001 - there is an autoscaler, but its config could not be read
            failed.append(f"{name} could not be read ({type(e).__name__}: {e})")
            continue
        if autoscaling is not None:
            return Capacity(nodes, autoscaling, name)
    if failed:
        return Capacity(nodes, None, "; ".join(failed))
    return Capacity(nodes, Autoscaling([]), "no autoscaler config found: a fixed cluster")


def cluster_address(address: str | None) -> str | None:
    """The existing cluster a run joins: ``--address``, else ``$RAY_ADDRESS`` (set by ``ray job
    submit`` too); None when it starts a Ray instance of its own ("local" asks for that). A
    dashboard URL (``http://head:8265``, what ``ray job submit`` reads from ``$RAY_ADDRESS``) is
    not one a driver can join: ValueError saying how to run the command there."""
    given = address or os.environ.get("RAY_ADDRESS")
    if given in (None, "", "local"):
        return None
    if given.startswith(("http://", "https://")):
        where = "--address" if address else "RAY_ADDRESS"
        raise ValueError(f"{where}={given} is a Ray dashboard's address, which only `ray job submit` uses: run this "
                         f"command on the cluster with `ray job submit --working-dir . -- python jobs/...`, or give "
                         f"--address the cluster's own address (host:6379) from a machine that reaches it")
    return given


def default_use_gpu(joined: bool, gpus_here: float) -> bool:
    """GPUs on a cluster the run joins (its autoscaler adds GPU nodes only when asked for them);
    on a Ray instance the run starts itself, the GPUs it has."""
    return joined or gpus_here > 0


def worker_bundle(cpus: float, gpus: float, use_gpu: bool) -> dict[str, float]:
    """One training worker's resources, as Ray is asked for them."""
    return {"CPU": cpus, **({"GPU": gpus} if use_gpu and gpus > 0 else {})}


@dataclass(frozen=True)
class WorkerPlan:
    use_gpu: bool
    bundle: dict[str, float]  # one worker's resources
    fits_now: bool
    note: str  # what the run is about to do, for the log


def plan_workers(num_workers: int, cpus: float, gpus: float, use_gpu: bool | None, joined: bool,
                 capacity: Capacity, start_timeout_s: float) -> WorkerPlan:
    """The GPU decision and the feasibility check (see the module docstring). Raises
    `InfeasibleCluster` with a message naming the flags when the group can never be placed."""
    insisted = use_gpu is True  # --use-gpu: GPUs will come, even if this run cannot see how
    if use_gpu is None:
        use_gpu = default_use_gpu(joined, capacity.totals["GPU"])
    bundle = worker_bundle(cpus, gpus, use_gpu)
    need = f"{num_workers} worker(s) x {_res(bundle)}"
    if fits(capacity.nodes, bundle) >= num_workers:
        return WorkerPlan(use_gpu, bundle, True, f"{need}: the cluster has room now")
    most = capacity.max_fit(bundle)
    if most is not None and most < num_workers and not insisted:
        raise InfeasibleCluster(_infeasible_message(need, use_gpu, bundle, capacity))
    how = ("the autoscaler can add them" if most is not None and most >= num_workers else
           "--use-gpu says they will come" if insisted else
           "this run cannot see what the autoscaler may add, so it waits for it")
    return WorkerPlan(use_gpu, bundle, False, f"{need}: not on the cluster now; {how} — waiting up to "
                      f"{start_timeout_s:g}s for the nodes (--start-timeout-s). {capacity.describe()}")


def _infeasible_message(need: str, use_gpu: bool, bundle: dict[str, float], capacity: Capacity) -> str:
    lines = [f"this Ray cluster can never hold {need}: {capacity.describe()}."]
    if use_gpu and "GPU" in bundle and not capacity.totals["GPU"] and not capacity.can_add("GPU"):
        lines.append("It has no GPU and cannot get one: train on CPUs with --no-use-gpu, or give the cluster a GPU node "
                     "type (cluster/aws.yaml, cluster/kuberay/raycluster.yaml). If GPU nodes will join by other means, "
                     "pass --use-gpu to wait for them.")
    else:
        lines.append("Lower --num-workers/--cpus-per-worker/--gpus-per-worker, or add nodes (or node types).")
    return " ".join(lines)


def max_concurrent(per_trial_workers: int, bundle: dict[str, float], capacity: Capacity, trials: int) -> int:
    """Of ``trials`` trials of ``per_trial_workers`` workers each, how many the cluster can run at
    once when grown as far as it can (as it is now when that cannot be known); at least 1."""
    most = capacity.max_fit(bundle)
    if most is None:
        most = fits(capacity.nodes, bundle)
    return max(1, min(trials, most // per_trial_workers))
