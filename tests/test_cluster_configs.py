"""cluster/: the launcher config validates against Ray's own schema; the KubeRay manifests
against the CRD fields we rely on; the runtime env and the commands in them point at real things;
the spot watcher sends its drain until the GCS takes it."""

import copy
import json
import os
import shlex
import subprocess

import jsonschema
import pytest
import yaml

from mtl.distributed.tune import TRIAL_RESOURCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(rel: str):
    with open(os.path.join(REPO, rel)) as fh:
        return yaml.safe_load(fh)


def validate_launcher(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before anything else


def test_aws_launcher_config_validates_against_rays_schema():
    cfg = load("cluster/aws.yaml")
    validate_launcher(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0  # no training on the head
    assert types[cfg["head_node_type"]]["resources"][TRIAL_RESOURCE] >= 100  # sweeps' trials wait there, off the spot nodes
    assert any(t.get("resources", {}).get("GPU", 0) > 0 for t in types.values())
    assert any("pip install" in c and "[aws]" in c for c in cfg["setup_commands"])  # [cluster] + boto3: the autoscaler needs it
    # the tested set on the Python it was made on; the checkout without what git ignores (.venv...)
    assert any("--python 3.11" in c for c in cfg["setup_commands"])
    assert any("-c /home/ubuntu/streetmtl/constraints.txt" in c for c in cfg["setup_commands"])
    assert cfg["rsync_filter"] == [".gitignore"] and "**/.git" in cfg["rsync_exclude"]
    assert any("--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])
    watch = [c for c in cfg["worker_start_ray_commands"] if "python" in c and "spot_watch.py" in c]  # spot notices: Ray drains
    assert len(watch) == 1 and os.path.exists(os.path.join(REPO, "cluster/spot_watch.py"))
    assert "--address $RAY_HEAD_IP:6379" in watch[0] and watch[0].rstrip().endswith("&")
    # the launcher runs each command in a subshell whose command line holds the command: stopping
    # an earlier watcher must not stop that shell (a plain `pkill -f cluster/spot_watch.py` did: exit 143)
    (stop,) = [c for c in cfg["worker_start_ray_commands"] if "pkill" in c]
    r = subprocess.run(["bash", "-c", f"export A=1 && ({stop.replace('~/venv/bin/ray stop', 'true')})"], capture_output=True)
    assert r.returncode == 0, r
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_a10g"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(bad)


# The parts of the RayCluster / RayJob CRDs (ray.io/v1, KubeRay 1.x) these manifests use. KubeRay
# wants rayStartParams values as strings and replicas within [minReplicas, maxReplicas].
QUANTITY = {"type": ["string", "integer"]}
CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"}, "image": {"type": "string"},
        "resources": {"type": "object", "properties": {
            "requests": {"type": "object", "additionalProperties": QUANTITY},
            "limits": {"type": "object", "additionalProperties": QUANTITY}}, "additionalProperties": False},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    },
}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"],
    "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}}}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                          "properties": {"rayStartParams": START_PARAMS, "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
            "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"}, "minReplicas": {"type": "integer"},
                           "maxReplicas": {"type": "integer"}, "rayStartParams": START_PARAMS, "template": POD_TEMPLATE}}},
    },
}
RAYCLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
              "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "spec": CLUSTER_SPEC}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
          "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "spec": {
              "type": "object", "required": ["entrypoint", "rayClusterSpec"],
              "properties": {"entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                             "shutdownAfterJobFinishes": {"type": "boolean"}, "rayClusterSpec": CLUSTER_SPEC}}}}


def check_cluster_spec(spec: dict) -> None:
    ray_version = spec["rayVersion"]
    import ray
    assert ray_version == ray.__version__  # image and client agree
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu")  # GPUs: requests == limits
        pod = g["template"]["spec"]
        if res["requests"].get("nvidia.com/gpu"):  # GPU nodes are usually tainted
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", [])
        # a reclaimed node: Ray drains for this long (SIGTERM), inside the pod's grace period
        drain = {e["name"]: e["value"] for e in pod["containers"][0].get("env", [])}["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]
        assert float(drain) + 5 <= pod["terminationGracePeriodSeconds"]


def check_trials_wait_on_the_head(spec: dict) -> None:
    """KubeRay's form for custom resources: a JSON object inside quotes; sweeps' trials wait on the head."""
    assert json.loads(json.loads(spec["headGroupSpec"]["rayStartParams"]["resources"]))[TRIAL_RESOURCE] >= 100


def test_kuberay_raycluster_manifest():
    m = load("cluster/kuberay/raycluster.yaml")
    jsonschema.validate(m, RAYCLUSTER)
    check_cluster_spec(m["spec"])
    assert m["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    check_trials_wait_on_the_head(m["spec"])
    with open(os.path.join(REPO, "cluster/local.sh")) as fh:
        assert f"--resources='{{\"{TRIAL_RESOURCE}\": 1000}}'" in fh.read()


def test_kuberay_rayjob_manifest_runs_our_train_job():
    m = load("cluster/kuberay/rayjob.yaml")
    jsonschema.validate(m, RAYJOB)
    check_cluster_spec(m["spec"]["rayClusterSpec"])
    check_trials_wait_on_the_head(m["spec"]["rayClusterSpec"])  # (a RayJob may run a sweep too)
    yaml.safe_load(m["spec"]["runtimeEnvYAML"])
    argv = shlex.split(m["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and os.path.exists(os.path.join(REPO, argv[1]))
    from jobs.train import parse
    _, cfg = parse(argv[2:])  # the flags in the manifest are flags the job accepts
    assert cfg.model.arch == "distillation" and cfg.dist.num_workers == 4


def test_schema_rejects_a_broken_manifest():
    m = load("cluster/kuberay/raycluster.yaml")
    m["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, RAYCLUSTER)


def test_kuberay_pods_get_credentials_from_kubernetes_and_may_read_their_raycluster():
    rbac = {item["kind"]: item for item in load("cluster/kuberay/rbac.yaml")["items"]}
    account = rbac["ServiceAccount"]["metadata"]["name"]
    assert rbac["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get"]} in rbac["Role"]["rules"]
    for spec in (load("cluster/kuberay/raycluster.yaml")["spec"], load("cluster/kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == account
            assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "streetmtl-s3", "optional": True}}]


def test_runtime_env_recipe():
    env = load("cluster/runtime_env.yaml")
    assert env["working_dir"] == "." and "/.venv" in env["excludes"]
    assert not any("SECRET" in k or "KEY" in k or "TOKEN" in k for k in env.get("env_vars", {}))  # no credentials through Ray
    from ray.runtime_env import RuntimeEnv
    RuntimeEnv(**env)  # Ray accepts it


def test_runtime_env_ships_every_tracked_file_and_no_data(tmp_path):
    """What Ray uploads for `--runtime-env cluster/runtime_env.yaml` (its own walk over the
    working dir, with the recipe's excludes and .gitignore): every file of the checkout, no data
    or run folder (excludes match at any depth unless anchored: "data" took mtl/data too)."""
    import shutil

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    work = tmp_path / "checkout"
    for f in tracked:
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, f), work / f)
    for junk in ("data/miniscapes/train/rgb/0.jpg", "runs/r/state.pt", "out/x.png", ".venv/lib/x.py", "shards/train-000000.tar"):
        (work / junk).parent.mkdir(parents=True, exist_ok=True)
        (work / junk).write_bytes(b"x")
    shipped = []
    _dir_travel(work, [_get_excludes(work, load("cluster/runtime_env.yaml")["excludes"])],
                lambda p: p.is_file() and shipped.append(p.relative_to(work).as_posix()), include_gitignore=True)
    assert sorted(shipped) == sorted(tracked)
    assert "mtl/data/shards.py" in shipped


class _Clock:
    """A stand-in for spot_watch's ``time``: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_spot_watcher_asks_again_until_the_drain_is_sent_and_gives_up_at_the_deadline(monkeypatch, capsys):
    """The notice comes once: a drain the GCS did not take (an RPC failure) is sent again each
    second until it is taken, and the watcher fails with the RPC's error only once the node's
    deadline has passed. A drain Ray refuses is an error at once. (The drain itself, end to end:
    test_train_on_ray's spot test.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spot_watch", os.path.join(REPO, "cluster/spot_watch.py"))
    spot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spot)
    clock, calls, answers = _Clock(), [], []

    class Gcs:
        def __init__(self, address: str) -> None:
            self.address = address

        def drain_node(self, node, reason, message, until_ms):
            calls.append((self.address, node, reason, message, until_ms, clock.now))
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr("ray._raylet.GcsClient", Gcs)
    monkeypatch.setattr(spot, "time", clock)
    from ray.core.generated import autoscaler_pb2

    preemption = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    until = int((clock.now + 100) * 1000)
    answers[:] = [ConnectionError("GCS unavailable"), ConnectionError("GCS unavailable"), (True, "")]
    spot.drain("head:6379", "n1", until, "EC2 spot interruption")
    assert [c[:5] for c in calls] == [("head:6379", "n1", preemption, "EC2 spot interruption", until)] * 3
    assert [c[5] - calls[0][5] for c in calls] == [0, 1, 2]  # a second apart
    assert capsys.readouterr().out.count("drain not sent (GCS unavailable); trying again") == 2

    calls.clear()
    answers[:] = [ConnectionError("GCS unavailable")] * 10
    with pytest.raises(ConnectionError, match="GCS unavailable"):
        spot.drain("head:6379", "n1", int((clock.now + 3) * 1000), "EC2 spot interruption")
    assert len(calls) == 4  # at 0, 1, 2 s, and at the deadline: no more

    answers[:] = [(False, "the node is busy")]
    with pytest.raises(RuntimeError, match="^Ray refused to drain node n1: the node is busy$"):
        spot.drain("head:6379", "n1", int((clock.now + 100) * 1000), "EC2 spot interruption")
