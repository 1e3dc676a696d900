"""Sharding over devices (4 simulated CPU devices in a subprocess): every mesh gives the loss
trajectory of one device; FSDP divides the per-device state; the kernel runs per shard; a
checkpoint restores onto another mesh; impossible meshes are refused naming the key."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from genesis_jax import config as C
from genesis_jax.errors import ConfigError

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def check(*args: str) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_check.py"), *args], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_mesh_follows_the_one_device_losses_and_fsdp_divides_the_state():
    out = check("xla")  # data=4, fsdp=4, data=2 x tensor=2, fsdp=2 x tensor=2; accumulation 2, WWM masking
    one = out.pop("one")
    assert one["losses"][-1] < one["losses"][0]
    for name, got in out.items():
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=2e-6, err_msg=name)
        assert got["devices"] == 4
    assert out["data4"]["max_bytes_per_device"] == one["max_bytes_per_device"]  # replicated
    assert 0.24 < out["fsdp4"]["max_bytes_per_device"] / one["max_bytes_per_device"] < 0.27  # measured, ~1/4
    assert out["fsdp2_tensor2"]["max_bytes_per_device"] < out["data2_tensor2"]["max_bytes_per_device"]


def test_the_pallas_kernel_runs_per_shard_on_a_mesh():
    out = check("pallas", "one,fsdp2_tensor2")
    np.testing.assert_allclose(out["fsdp2_tensor2"]["losses"], out["one"]["losses"], rtol=2e-6)
    # batch 8 over fsdp 2, 4 query heads over tensor 2 (2 KV heads: 1 each): the kernel's own block.
    assert check("local_shape") == [4, 16, 2, 8]


@pytest.mark.parametrize("parallel, message", [
    ({"tensor": 3}, "parallel.tensor = 3 does not divide model.n_kv_heads = 4"),
    ({"data": -1, "fsdp": -1}, "parallel: at most one of data, fsdp and tensor may be -1"),
    ({"fsdp": 0}, "parallel.fsdp = 0: must be positive, or -1 for the remaining devices"),
])
def test_impossible_meshes_are_refused_naming_the_key(parallel, message):
    with pytest.raises(ConfigError) as e:
        C.from_dict({"parallel": parallel})
    assert message in str(e.value)


def test_mesh_sizes_against_the_device_count():
    from genesis_jax.sharding import mesh_shape

    p = lambda **kw: C.ParallelConfig(**kw)  # noqa: E731
    assert mesh_shape(p(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape(p(data=1, fsdp=-1, tensor=2), 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match=r"data x fsdp x tensor = 2 x 2 x 1 = 4, but there are 8 devices"):
        mesh_shape(p(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match=r"parallel.data = -1: the other axes \(3 devices\) do not divide"):
        mesh_shape(p(tensor=3), 8)
