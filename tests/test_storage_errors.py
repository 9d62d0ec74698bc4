"""Storage a user got wrong, on a real S3 endpoint (moto on loopback): missing AWS credentials and
a misspelt bucket are one error line naming the URL and what to check, and nothing is created."""

from __future__ import annotations

import pytest


def _shard_main():
    from data_prep.shard import main

    return main


@pytest.fixture
def no_aws_credentials(s3_endpoint, monkeypatch):
    """The moto endpoint with no credentials anywhere botocore looks: no key variables, no
    ~/.aws files, no instance metadata. s3fs's cached filesystems (which hold their
    credentials) are dropped before and after."""
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_sharding_without_aws_credentials_names_the_url_and_what_to_set(no_aws_credentials, tiny_root, tmp_path, in_process):
    """A user who forgot `aws configure` gets one line naming the bucket it tried and the
    settings to check, not botocore's traceback, whether S3 is the source or the destination."""
    for args, url in ((["--src", "s3://streetmtl/miniscapes", "--dst", str(tmp_path / "s")], "s3://streetmtl/miniscapes"),
                      (["--src", tiny_root, "--dst", "s3://streetmtl/shards", "--splits", "val"], "s3://streetmtl/shards")):
        r = in_process(_shard_main(), args)
        # (a loaded machine may hold the call past the slow-call note's 30 s: that note is not the subject here)
        lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("still waiting for ")]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and url in lines[0] and "Unable to locate credentials" in lines[0]
        assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_PROFILE" in lines[0] and "instance role" in lines[0]
    assert not (tmp_path / "s").exists()


def test_a_missing_region_says_to_set_it():
    from botocore.exceptions import NoRegionError

    from mtl.storage import StorageError, storage_errors

    with pytest.raises(StorageError, match=r"^cannot access s3://b/x: You must specify a region. .set AWS_DEFAULT_REGION"):
        with storage_errors("s3://b/x"):
            raise NoRegionError()


def test_a_misspelt_bucket_is_named_and_never_created(s3_endpoint, tiny_root, in_process):
    """s3fs's makedirs creates a bucket that does not exist: a typo in --shards would have made a
    new bucket and filled it. Now the write fails, naming the bucket, and no bucket appears."""
    import boto3

    from mtl.storage import write_bytes_atomic

    def buckets() -> list[str]:
        return sorted(b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"])

    before = buckets()
    with pytest.raises(FileNotFoundError, match="^bucket s3://missing-bucket does not exist .writing s3://missing-bucket/x."):
        write_bytes_atomic("s3://missing-bucket/x", b"")
    r = in_process(_shard_main(), ["--src", tiny_root, "--dst", "s3://streetmtl-typo/shards", "--splits", "val", "--shard-size", "8"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: bucket s3://streetmtl-typo does not exist (writing s3://streetmtl-typo/shards/")
    assert buckets() == before
    write_bytes_atomic("s3://streetmtl/some/deep/prefix/x", b"1")  # a prefix needs no folder made
    assert boto3.client("s3").get_object(Bucket="streetmtl", Key="some/deep/prefix/x")["Body"].read() == b"1"


def test_reading_from_a_misspelt_bucket_names_the_bucket(s3_endpoint, tmp_path, in_process):
    """A typo in the bucket of a URL to read says that bucket does not exist, instead of naming a
    manifest, folder, checkpoint or image missing inside it; in a bucket that exists those
    messages stay as they were."""
    import boto3

    from jobs import train
    from mtl.checkpoint import load_checkpoint
    from mtl.data.folder import split_modalities
    from mtl.data.shards import read_manifest
    from mtl.predict import find_images

    for read, what in ((read_manifest, "/manifest.json"), (lambda u: split_modalities(u, "train"), ""),
                       (lambda u: load_checkpoint(u + "/best.pt"), "/best.pt"), (find_images, "")):
        with pytest.raises(FileNotFoundError, match=rf"^bucket s3://streetmtl-typo does not exist \(reading "
                                                    rf"s3://streetmtl-typo/x{what}\): check its name$"):
            read("s3://streetmtl-typo/x")
    with pytest.raises(FileNotFoundError, match="^no shard manifest at s3://streetmtl/x/manifest.json"):
        read_manifest("s3://streetmtl/x")
    with pytest.raises(FileNotFoundError, match="^Miniscapes folder missing: s3://streetmtl/x/train/rgb"):
        split_modalities("s3://streetmtl/x", "train")
    with pytest.raises(FileNotFoundError, match="^checkpoint not found: s3://streetmtl/x/best.pt"):
        load_checkpoint("s3://streetmtl/x/best.pt")
    r = in_process(train.main, ["--local", "--shards", "s3://streetmtl-typo/shards", "--out", str(tmp_path / "runs")])
    assert r.returncode == 2 and r.stderr.startswith("error: bucket s3://streetmtl-typo does not exist (reading "), r.stderr
    assert "streetmtl-typo" not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_an_object_store_refusing_the_credentials_is_named():
    """A 403 (keys wrong, expired or another account's; a bucket policy) reaches s3fs as a bare
    PermissionError("Forbidden") raised from botocore's answer: it names the URL and what to
    check; an archived object and a skewed clock say so. An expired SSO login says how to log in.
    A PermissionError that is no store's answer (a local file's, inside the same block) stays as
    it is. (Seen against moto with its IAM checks on, INITIAL_NO_AUTH_ACTION_COUNT=1: `jobs/train.py
    --out s3://…` printed only "error: Forbidden".)"""
    from botocore.exceptions import ClientError, SSOTokenLoadError
    from s3fs.errors import translate_boto_error

    from mtl.storage import storage_errors

    def refused(code: str, message: str) -> Exception:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": message}}, "HeadObject"))

    def raised(url: str, e: Exception) -> str:
        with pytest.raises(Exception) as caught:
            with storage_errors(url):
                raise e
        return f"{type(caught.value).__name__}: {caught.value}"

    assert raised("s3://b/runs/x", refused("403", "Forbidden")) == (
        "StorageError: cannot access s3://b/runs/x: Forbidden (403: the store refused the credentials in use: wrong or expired "
        "keys, another account's or AWS_PROFILE's, or a bucket policy that does not let them in)")
    assert "(InvalidObjectState: the object is archived" in raised("s3://b/x", refused("InvalidObjectState", "archived"))
    assert "(RequestTimeTooSkewed: this machine's clock" in raised("s3://b/x", refused("RequestTimeTooSkewed", "skewed"))
    assert raised("s3://b/x", SSOTokenLoadError(error_msg="the token expired")).startswith(
        "StorageError: cannot access s3://b/x: ") and "(an SSO login that expired or never happened: aws sso login" in \
        raised("s3://b/x", SSOTokenLoadError(error_msg="the token expired"))
    local = PermissionError(13, "Permission denied", "/srv/train/rgb/0.jpg")  # (a source file, read inside a block for s3://)
    assert raised("s3://b/shards", local) == "PermissionError: [Errno 13] Permission denied: '/srv/train/rgb/0.jpg'"


def test_an_endpoint_that_never_answers_is_said_while_waiting_and_named_when_it_fails(monkeypatch, capsys):
    """An endpoint that accepts connections and never answers (a firewall, a proxy, a wrong port)
    was silent until botocore gave up: 7 minutes with its defaults. A call without an answer for
    `SLOW_NOTE_S` is said once, naming the URL and endpoint; when the client gives up (here
    after a 3 s read timeout), the error names them too."""
    import contextlib
    import re
    import socket
    import threading
    import time

    import fsspec.config
    import s3fs

    import mtl.storage as storage
    from mtl.data.shards import read_manifest

    server, held = socket.create_server(("127.0.0.1", 0)), []

    def accept_and_never_answer():
        with contextlib.suppress(OSError):  # (until the server is closed)
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept_and_never_answer, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "SLOW_NOTE_S", 0.5)
    # (bounded however the endpoint behaves: in the full suite the wait once took 86 s instead of 3)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"connect_timeout": 3, "read_timeout": 3}})
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    failed = []
    reader = threading.Thread(target=lambda: failed.extend(_raised(read_manifest, "s3://bucket/shards")))
    reader.start()
    reader.join(60)  # (the client gives up after its read timeout)
    server.shutdown(socket.SHUT_RDWR)  # (accept() returns)
    server.close()
    for c in held:
        c.close()
    s3fs.S3FileSystem.clear_instance_cache()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("still waiting")]
    assert len(notes) == 1 and re.fullmatch(
        rf"still waiting for s3://bucket/shards/manifest.json at endpoint {endpoint}: a call has run for \d s \(a large transfer "
        rf"may; an endpoint that never answers holds it until the client gives up, after 1 attempts as AWS_MAX_ATTEMPTS .*", notes[0]), notes
    assert failed and failed[0].startswith(f"StorageError: cannot reach s3://bucket/shards/manifest.json at endpoint {endpoint}"), failed
    assert not storage._waiting  # (the finished call is no longer watched)
    # a block inside a watched one is not said again; one that does other work too (watch=False) is not timed
    with storage.storage_errors("memory://b/listing"), storage.storage_errors("memory://b/listing/one"):
        time.sleep(1.5)
    with storage.storage_errors("memory://b/shard-0", watch=False):
        time.sleep(1.5)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("still waiting")]
    assert len(notes) == 1 and notes[0].startswith("still waiting for memory://b/listing: a call has run for ") and \
        notes[0].endswith("until the client gives up)"), notes  # (no AWS settings named for another store)


def _raised(fn, *args) -> list[str]:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - what a reader thread ended with
        return [f"{type(e).__name__}: {e}"]
    return []


def test_a_storage_client_installed_but_failing_to_import_says_so(tmp_path):
    """fsspec says "Install s3fs to access S3" for any import failure of s3fs; one that is there
    but fails (a version conflict) is said as such, with its own error, not as missing."""
    import os
    import subprocess
    import sys

    (tmp_path / "s3fs").mkdir()
    (tmp_path / "s3fs" / "__init__.py").write_text("raise ImportError('aiobotocore 9 is not supported')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from mtl.storage import StorageError, url_to_fs\n"
            "try:\n    url_to_fs('s3://bucket/runs')\n"
            "except StorageError as e:\n    print(e, '|', type(e.__cause__).__name__)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == ("s3://bucket/runs: the storage client for s3:// (s3fs) is installed but cannot be imported: "
                                "ImportError: aiobotocore 9 is not supported | ImportError"), r.stdout + r.stderr
