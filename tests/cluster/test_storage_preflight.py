"""Cluster mode of the storage preflight: where Tune's results go, and which paths a cluster of
several nodes refuses. The refusal on a real multi-node Ray is in test_multinode.py."""

from __future__ import annotations

import pytest

from sweeps.launch import STORAGE_ENV, PreflightError, check_shared_storage, resolve_storage
from sweeps.spec import SpecError, parse_spec
from tests.conftest import small_spec_data


def test_storage_shared_defaults_to_false_and_is_validated(tmp_path):
    assert parse_spec(small_spec_data(tmp_path)).storage.shared is False
    spec = parse_spec(small_spec_data(tmp_path, storage={"shared": True}))
    assert spec.storage.shared is True
    with pytest.raises(SpecError, match=r"storage\.shared"):
        parse_spec(small_spec_data(tmp_path, storage={"shared": "sometimes"}))


@pytest.mark.parametrize("nodes", [0, 1])
def test_one_node_takes_any_local_path(nodes):
    check_shared_storage("/home/me/ray_results", shared=False, alive_nodes=nodes)


@pytest.mark.parametrize("path", ["s3://bucket/regsweep", "gs://bucket/x", "file:///mnt/nfs"])
def test_several_nodes_take_a_uri(path):
    check_shared_storage(path, shared=False, alive_nodes=3)


def test_several_nodes_take_a_local_path_declared_shared():
    check_shared_storage("/mnt/nfs/ray_results", shared=True, alive_nodes=3)


def test_several_nodes_refuse_a_head_only_path_and_say_how_to_fix_it():
    with pytest.raises(PreflightError) as refused:
        check_shared_storage("/home/me/ray_results", shared=False, alive_nodes=3)
    message = str(refused.value)
    for needed in ("storage.path", "/home/me/ray_results", "3 nodes", "s3://", STORAGE_ENV):
        assert needed in message
    assert "storage.shared: true" in message


def test_storage_env_overrides_the_spec_and_the_flag_overrides_both(tmp_path, monkeypatch):
    spec = parse_spec(small_spec_data(tmp_path))
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert resolve_storage(spec) == str(tmp_path / "ray_results")

    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/regsweep")
    assert resolve_storage(spec) == "s3://bucket/regsweep"
    assert resolve_storage(spec, str(tmp_path / "here")) == str(tmp_path / "here")
