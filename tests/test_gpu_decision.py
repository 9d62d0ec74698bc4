"""GPU or CPU workers, wait or fail: against fabricated capacities (fast) and the shipped cluster
configs (the same on real Ray clusters: test_gpu_decision_on_ray.py)."""

import os

import pytest
import yaml

from mtl.distributed.capacity import (Autoscaling, Capacity, InfeasibleCluster, NodeType, autoscaling_from_config, max_concurrent,
                                      plan_workers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ONLY_NOW = [{"CPU": 0, "GPU": 0}, {"CPU": 8, "GPU": 0}]


def cap(node_types, nodes=CPU_ONLY_NOW, source="test", max_nodes=None):
    return Capacity(nodes, None if node_types is None else Autoscaling(node_types, max_nodes), source)


def test_a_joined_cluster_that_can_add_gpu_nodes_trains_on_gpus_and_waits():
    p = plan_workers(4, 10, 1, None, True, cap([NodeType("gpu", {"CPU": 48, "GPU": 4}, 8)]), 900)
    assert p.use_gpu and p.bundle == {"CPU": 10, "GPU": 1} and not p.fits_now
    assert "the autoscaler can add them — waiting up to 900s" in p.note and "gpu x8 {CPU: 48, GPU: 4}" in p.note


def test_a_joined_cluster_that_can_never_have_a_gpu_fails_naming_the_cpu_flag():
    for types in ([], [NodeType("cpu", {"CPU": 16}, 4)]):
        with pytest.raises(InfeasibleCluster, match=r"It has no GPU and cannot get one: train on CPUs with --no-use-gpu"):
            plan_workers(1, 1, 1, None, True, cap(types), 900)
    p = plan_workers(2, 4, 1, False, True, cap([]), 900)  # --no-use-gpu
    assert not p.use_gpu and p.bundle == {"CPU": 4} and p.fits_now


def test_a_ray_instance_started_by_the_run_uses_this_machines_gpus():
    assert not plan_workers(1, 1, 1, None, False, cap([]), 900).use_gpu
    assert plan_workers(1, 1, 1, None, False, cap([], nodes=[{"CPU": 16, "GPU": 1}]), 900).use_gpu


def test_unknown_autoscaler_or_explicit_use_gpu_waits():
    unknown = cap(None, source="the KubeRay RayCluster could not be read (HTTPError: 403)")
    assert "cannot see what the autoscaler may add" in plan_workers(1, 1, 1, None, True, unknown, 60).note
    assert "--use-gpu says they will come" in plan_workers(1, 1, 1, True, True, cap([]), 60).note


def test_shipped_cluster_configs_can_grow_gpus():
    with open(os.path.join(REPO, "cluster/aws.yaml")) as fh:
        aws = autoscaling_from_config(yaml.safe_load(fh))
    assert [(t.name, t.resources, t.max_count) for t in aws.node_types] == [("gpu_a10g", {"CPU": 48.0, "GPU": 4.0}, 8)]
    assert aws.max_nodes == 8
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    with open(os.path.join(REPO, "cluster/kuberay/raycluster.yaml")) as fh:
        cr = yaml.safe_load(fh)
    cr["metadata"]["namespace"] = "default"  # the API server fills it in
    kuberay = autoscaling_from_config(_derive_autoscaling_config_from_ray_cr(cr))
    assert [(t.name, t.resources.get("GPU"), t.max_count) for t in kuberay.node_types] == [("gpu", 1.0, 8)]


def test_what_a_cluster_can_grow_to_counts_each_node_once():
    gpu = NodeType("gpu", {"CPU": 48, "GPU": 4}, 8)
    head = {"CPU": 0, "GPU": 0}
    bundle = {"CPU": 10, "GPU": 1}
    assert Capacity([head], Autoscaling([gpu], 8), "t").max_fit(bundle) == 32  # 8 nodes x 4 GPUs
    grown = Capacity([head] + [{"CPU": 48, "GPU": 4}] * 8, Autoscaling([gpu], 8), "t")
    assert grown.max_fit(bundle) == 32  # the 8 nodes that are up are the type's 8, not 8 more
    # the cluster-wide cap holds over several types (e.g. aws.yaml's block copied for p4d)
    p4d = NodeType("p4d", {"CPU": 96, "GPU": 8}, 8)
    assert Capacity([head], Autoscaling([gpu, p4d], 8), "t").max_fit(bundle) == 8 * 8
    # sweeps size their concurrency from what the cluster can grow to, not what it has at submit
    # time, and never above the number of trials
    assert max_concurrent(2, bundle, cap([gpu], max_nodes=8), 64) == 16
    assert max_concurrent(2, bundle, cap([gpu], max_nodes=8), 6) == 6
    assert max_concurrent(2, bundle, cap(None), 6) == 1


def test_a_source_that_cannot_be_read_does_not_hide_the_next(monkeypatch):
    import ray

    from mtl.distributed import capacity

    def broken():
        raise RuntimeError("API changed")

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(capacity, "SOURCES", [("first", broken), ("second", lambda: Autoscaling([NodeType("g", {"GPU": 1}, 2)]))])
    assert capacity.read_capacity().source == "second"
    monkeypatch.setattr(capacity, "SOURCES", [("first", broken), ("second", lambda: None)])
    unknown = capacity.read_capacity()
    assert unknown.autoscaling is None and unknown.source == "first could not be read (RuntimeError: API changed)"
    monkeypatch.setattr(capacity, "SOURCES", [("first", lambda: None)])
    assert capacity.read_capacity().max_fit({"CPU": 1}) == 2  # fixed: what is there


def test_a_kuberay_pod_without_the_namespace_variable_reads_its_service_accounts(monkeypatch, tmp_path):
    """KubeRay before 1.6 sets RAY_CLUSTER_NAMESPACE only in the autoscaler's container: the Ray
    container's driver reads the pod's namespace instead (else "a fixed cluster", no GPU ever)."""
    from ray.autoscaler._private.kuberay import autoscaling_config

    from mtl.distributed import capacity

    asked = []

    class Producer:
        def __init__(self, name, namespace):
            asked.append((name, namespace))

        def __call__(self):
            return {"available_node_types": {"gpu": {"resources": {"GPU": 4, "CPU": 48}, "max_workers": 2}}}

    monkeypatch.setattr(autoscaling_config, "AutoscalingConfigProducer", Producer)
    (tmp_path / "namespace").write_text("ml-team\n")
    monkeypatch.setattr(capacity, "SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "namespace"))
    monkeypatch.setenv("RAY_CLUSTER_NAME", "streetmtl")
    monkeypatch.delenv("RAY_CLUSTER_NAMESPACE", raising=False)
    found = capacity._from_kuberay()
    assert asked == [("streetmtl", "ml-team")] and found is not None and found.node_types[0].resources["GPU"] == 4
    monkeypatch.delenv("RAY_CLUSTER_NAME")
    assert capacity._from_kuberay() is None  # (not on KubeRay)


def test_a_dashboard_address_is_refused_saying_how_to_submit(monkeypatch):
    from mtl.distributed.capacity import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS=http://127.0.0.1:8265 is a Ray dashboard's address, which only "
                                         r"`ray job submit` uses: run this command on the cluster with `ray job submit"):
        cluster_address(None)
    assert cluster_address("10.0.0.5:6379") == "10.0.0.5:6379"
    from jobs.train import main  # (--print-config starts nothing: with that address it shows a cluster's run)

    assert main(["--print-config", "--quick"]) == 0
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address(None) is None


def test_the_start_timeout_reaches_ray_train_from_the_process_that_builds_the_trainer(monkeypatch):
    """Ray Train reads its worker-group start timeout from the environment of the process that
    calls ``fit``: a sweep's trial actor, whose environment is not the driver's, must set it too."""
    from mtl.config import DistConfig, ExperimentConfig
    from mtl.distributed.ray_train import START_TIMEOUT_ENV, make_trainer

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    make_trainer(ExperimentConfig(dist=DistConfig(start_timeout_s=300)), {"CPU": 1})
    assert float(os.environ[START_TIMEOUT_ENV]) == 300
    # the defaults: nodes may boot for a fixed group; an elastic one goes on without the lost node
    for dist, want in ((DistConfig(), 900), (DistConfig(num_workers=2, min_workers=1), 60)):
        make_trainer(ExperimentConfig(dist=dist), {"CPU": 1})
        assert float(os.environ[START_TIMEOUT_ENV]) == want


def test_a_driver_joining_a_cluster_from_a_shell_gives_its_job_the_workers_environment(monkeypatch):
    """A sweep's trials run in actors, in the nodes' environment: a driver that joins a running
    cluster by address passes the forwarded variables (never keys) to its job; a submitted job
    (its own runtime env) and a cluster the driver starts (inherited) pass none."""
    import ray

    from mtl.config import DistConfig, ExperimentConfig
    from mtl.distributed import ray_train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv(ray_train.SUBMITTED_JOB_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ray_train.FORWARD_ENV[1:]:
        monkeypatch.delenv(name, raising=False)
    assert ray_train.connect(ExperimentConfig(dist=DistConfig(address="head:6379")))
    assert calls[-1]["runtime_env"] == {"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000"}}
    assert not ray_train.connect(ExperimentConfig())  # (a local instance: inherited)
    assert "runtime_env" not in calls[-1]
    monkeypatch.setenv(ray_train.SUBMITTED_JOB_ENV, "{}")
    ray_train.connect(ExperimentConfig(dist=DistConfig(address="head:6379")))
    assert "runtime_env" not in calls[-1]


def test_ray_keeps_the_checkpoint_the_pointer_names_until_the_next_commit():
    """Ray deletes past num_to_keep as it registers a report, before rank 0 moves latest.json to
    it: with --keep-last 1 Ray keeps 2, so the pointer never names a deleted folder."""
    from mtl.config import ExperimentConfig
    from mtl.distributed.ray_train import make_trainer

    for keep, ray_keeps in ((1, 2), (2, 2), (5, 5), (0, None)):
        trainer = make_trainer(ExperimentConfig().with_values({"train.keep_last": keep}), {"CPU": 1})
        assert trainer.run_config.checkpoint_config.num_to_keep == ray_keeps, keep


def test_failures_are_counted_over_the_run_and_minus_one_is_no_limit():
    """--max-failures is Ray's count over the whole run (-1: none); placing the group may fail
    once for a fixed size, as often as a worker may for an elastic one (after a node's loss Ray
    may aim at the lost node and time out)."""
    from mtl.config import ExperimentConfig
    from mtl.distributed.ray_train import make_trainer

    for failures, elastic, controller in ((3, False, 1), (3, True, 3), (0, True, 1), (-1, False, 1), (-1, True, -1)):
        cfg = ExperimentConfig().with_values({"dist.max_failures": failures, "dist.num_workers": 2,
                                              "dist.min_workers": 1 if elastic else None, "train.checkpoint_every": 10}).validate()
        config = make_trainer(cfg, {"CPU": 1}).run_config.failure_config
        assert (config.max_failures, config.controller_failure_limit) == (failures, controller), (failures, elastic)
