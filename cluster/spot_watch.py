"""An EC2 spot interruption notice, turned into a Ray drain of this node.

EC2 announces a spot reclaim two minutes ahead, but only in the instance metadata
(``spot/instance-action``); the processes hear of it when the instance shuts down, too late for
a checkpoint. Ray learns of a reclaim only when a node is drained with the preemption reason (on
Kubernetes, `ray start --block` does that on SIGTERM; a launcher node started without ``--block``
never does). This watcher, started on every spot node after `ray start` (`cluster/aws.yaml`),
polls the metadata and, when the notice comes, drains the node with the notice's deadline: Ray
Train's preemption watcher passes it to the training loop, which checkpoints after every step
until the node goes (`--preemption-poll-every`), and Ray restarts the workers elsewhere from the
last checkpoint, out of a retry budget of its own.

    python cluster/spot_watch.py --address $RAY_HEAD_IP:6379

Its output (one line per event) goes wherever the launcher sends it (`/tmp/spot_watch.log`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.error
import urllib.request

IMDS = "http://169.254.169.254"  # the instance metadata service (IMDSv2: a session token first)
TOKEN_TTL_S = 21600
NOTICE_S = 120  # what EC2 gives, used when the notice's time cannot be read


class Metadata:
    """The instance metadata over IMDSv2 (a token in every request, renewed when refused)."""

    def __init__(self, base: str = IMDS, timeout_s: float = 2.0) -> None:
        self.base, self.timeout_s, self.token = base.rstrip("/"), timeout_s, None

    def _renew(self) -> None:
        req = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            self.token = r.read().decode()

    def get(self, path: str) -> str | None:
        """The text at ``path``, None when the service has none (404)."""
        for attempt in range(2):
            if self.token is None:
                self._renew()
            req = urllib.request.Request(f"{self.base}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": self.token})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code != 401 or attempt:
                    raise
                self.token = None  # expired: once more with a new one
        return None


def deadline_ms(notice: str, now_s: float) -> int:
    """When the node goes (ms since the epoch), from the notice ``{"action": "terminate",
    "time": "2026-11-29T12:00:00Z"}``; two minutes from now when its time cannot be read."""
    try:
        when = datetime.datetime.strptime(json.loads(notice)["time"], "%Y-%m-%dT%H:%M:%SZ")
        return int(when.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
    except (ValueError, KeyError, TypeError):
        return int((now_s + NOTICE_S) * 1000)


def local_node_id(address: str, wait_s: float = 300.0) -> str:
    """This machine's Ray node (a driver connected for a moment: Ray places it on the local node),
    asked again until ``wait_s`` has passed (the node may still be starting)."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            try:
                return ray.get_runtime_context().get_node_id()
            finally:
                ray.shutdown()
        except Exception as e:  # noqa: BLE001 - Ray raises many types while a node starts
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot find this machine's Ray node at {address}: {e}") from e
            print(f"Ray node not found yet ({e}); trying again", flush=True)
            time.sleep(5)


def drain(address: str, node_id: str, until_ms: int, message: str) -> None:
    """Drain the node with the preemption reason, asked again until the deadline (the GCS may
    hiccup, and the notice comes once)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    while True:
        try:
            accepted, why = GcsClient(address=address).drain_node(
                node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, until_ms)
        except Exception as e:  # noqa: BLE001 - an RPC failure: again, while there is time
            if time.time() * 1000 >= until_ms:
                raise
            print(f"drain not sent ({e}); trying again", flush=True)
            time.sleep(1)
            continue
        if not accepted:  # (preemption drains are not rejectable; said anyway)
            raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")
        return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the cluster's GCS, host:port ($RAY_HEAD_IP:6379)")
    p.add_argument("--node-id", help="the Ray node to drain (default: this machine's)")
    p.add_argument("--metadata-url", default=IMDS, help="the instance metadata service")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between looks at the metadata")
    a = p.parse_args(argv)
    node = a.node_id or local_node_id(a.address)
    meta = Metadata(a.metadata_url)
    print(f"watching {a.metadata_url} for a spot interruption of Ray node {node}", flush=True)
    while True:
        try:
            notice = meta.get("spot/instance-action")
        except Exception as e:  # noqa: BLE001 - the service hiccups (any error of urllib/http.client): look again
            print(f"metadata not read ({e}); trying again", flush=True)
            notice = None
        if notice is not None:
            until = deadline_ms(notice, time.time())
            drain(a.address, node, until, f"EC2 spot interruption: {notice.strip()}")
            print(f"spot interruption ({notice.strip()}): node {node} drained, {until / 1e3 - time.time():.0f} s left", flush=True)
            return
        time.sleep(a.poll_s)


if __name__ == "__main__":
    main()
