"""The S3 server the object-store tests use (tests/support/seaweed.py): it stops without leaving a
process behind, keeps its objects across an outage, and two run side by side."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.seaweed import SeaweedFS

pytestmark = pytest.mark.slow  # starts servers: not in `make test-quick`


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_leaves_no_process_of_the_group(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "data").start()
    assert server.proc is not None
    pgid = server.proc.pid  # start_new_session: the server leads its own group
    assert _group_alive(pgid)
    server.stop()
    assert not _group_alive(pgid) and server.proc is None
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{server.ports['s3.port']}.sock"))
    server.stop()  # stopping twice is harmless


def test_an_object_written_before_an_outage_is_there_after_the_restart(tmp_path: Path) -> None:
    with SeaweedFS(tmp_path / "data") as server:
        assert server.make_bucket("outage") == "s3://outage"
        client = server.client()
        client.put_object(Bucket="outage", Key="a/b.bin", Body=b"\x00kept\xff" * 1000)
        endpoint = server.endpoint
        server.kill()
        import botocore.exceptions

        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.list_buckets()  # the outage is real
        server.start()
        assert server.endpoint == endpoint  # same ports: clients configured before find it again
        assert client.get_object(Bucket="outage", Key="a/b.bin")["Body"].read() == b"\x00kept\xff" * 1000


def test_two_servers_side_by_side(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    import botocore.exceptions

    def has_bucket(server: SeaweedFS, name: str) -> bool:
        try:
            server.client().head_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] in ("404", "NoSuchBucket"), exc
            return False
        return True

    with SeaweedFS(tmp_path / "second") as second:
        assert second.endpoint != seaweedfs.endpoint
        seaweedfs.make_bucket("first-only")
        second.make_bucket("second-only")
        assert has_bucket(seaweedfs, "first-only") and not has_bucket(seaweedfs, "second-only")
        assert has_bucket(second, "second-only") and not has_bucket(second, "first-only")


def test_env_is_all_that_s3fs_needs(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    bucket = seaweedfs.make_bucket("env-only")
    fs, path = fsspec.core.url_to_fs(f"{bucket}/x.txt", skip_instance_cache=True)
    fs.pipe_file(path, b"via env")
    assert fs.cat_file(path) == b"via env"
