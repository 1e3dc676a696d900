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
from genesis_jax.core.errors import ConfigError

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


@pytest.fixture(scope="module")
def meshes() -> dict:
    """One subprocess runs every mesh (tests/e2e/multidevice_check.py)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "e2e" / "multidevice_check.py")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_mesh_follows_the_one_device_losses_and_fsdp_divides_the_state(meshes):
    out = {k: v for k, v in meshes.items() if k not in ("pallas_fsdp2_tensor2", "local_shape")}
    # data=4, fsdp=4, data=2 x tensor=2, fsdp=2 x tensor=2 with accumulation 2 and WWM masking
    plain = out.pop("fsdp2_tensor2_plain")  # and without either
    np.testing.assert_allclose(plain["losses"], out.pop("one_plain")["losses"], rtol=2e-6)
    one = out.pop("one")
    assert one["losses"][-1] < one["losses"][0]
    for name, got in out.items():
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=2e-6, err_msg=name)
        assert got["devices"] == 4
    assert out["data4"]["max_bytes_per_device"] == one["max_bytes_per_device"]  # replicated
    assert 0.24 < out["fsdp4"]["max_bytes_per_device"] / one["max_bytes_per_device"] < 0.27  # measured, ~1/4
    assert out["fsdp2_tensor2"]["max_bytes_per_device"] < out["data2_tensor2"]["max_bytes_per_device"]


def test_the_pallas_kernel_runs_per_shard_on_a_mesh(meshes):
    np.testing.assert_allclose(meshes["pallas_fsdp2_tensor2"]["losses"], meshes["one"]["losses"], rtol=2e-6)
    # batch 8 over fsdp 2, 4 query heads over tensor 2 (2 KV heads: 1 each): the kernel's own block.
    assert meshes["local_shape"] == [4, 16, 2, 8]


@pytest.mark.parametrize(
    "parallel, message",
    [
        ({"tensor": 3}, "parallel.tensor = 3 does not divide model.n_kv_heads = 4"),
        ({"data": -1, "fsdp": -1}, "parallel: at most one of data, fsdp and tensor may be -1"),
        ({"fsdp": 0}, "parallel.fsdp = 0: must be positive, or -1 for the remaining devices"),
    ],
)
def test_impossible_meshes_are_refused_naming_the_key(parallel, message):
    with pytest.raises(ConfigError) as e:
        C.from_dict({"parallel": parallel})
    assert message in str(e.value)


def test_mesh_sizes_against_the_device_count():
    from genesis_jax.parallel.sharding import mesh_shape

    p = lambda **kw: C.ParallelConfig(**kw)  # noqa: E731
    assert mesh_shape(p(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape(p(data=1, fsdp=-1, tensor=2), 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match=r"data x fsdp x tensor = 2 x 2 x 1 = 4, but there are 8 devices"):
        mesh_shape(p(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match=r"parallel.data = -1: the other axes \(3 devices\) do not divide"):
        mesh_shape(p(tensor=3), 8)


def devices_env(n: int) -> dict:
    return {
        **ENV,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}",
    }


def test_resume_onto_other_meshes_follows_the_uninterrupted_run(fixture_corpus, tmp_path):
    """fsdp=4 on 4 devices -> data=2 on 2 devices -> fsdp=2 x tensor=2 on 4 devices, each launch
    restoring the previous one's checkpoint into its own shardings: the losses of one
    uninterrupted single-device run. Then single-device `generate` and `eval` read the sharded checkpoint."""
    from test_resume import command, logged, write_config

    cfg = write_config(tmp_path / "run.toml", fixture_corpus)
    # A constant schedule: each launch stops at its own max_steps, which a cosine would depend on.
    steps = [
        "--set",
        "checkpoint.save_interval=8",
        "--set",
        "training.val_interval=8",
        "--set",
        "optim.schedule=constant",
    ]
    ref = tmp_path / "ref"  # runs beside the first launch of the other run
    ref_proc = subprocess.Popen(
        command(cfg, ref) + steps + ["--set", "training.max_steps=24"],
        env=devices_env(1),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "run"
    for n, mesh, until in (
        (4, ["parallel.data=1", "parallel.fsdp=4"], 8),
        (2, ["parallel.data=2"], 16),
        (4, ["parallel.data=1", "parallel.fsdp=2", "parallel.tensor=2"], 24),
    ):
        sets = [x for m in mesh for x in ("--set", m)] + ["--set", f"training.max_steps={until}"]
        r = subprocess.run(
            command(cfg, run) + steps + sets, env=devices_env(n), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"{n} cpu device(s)" in r.stdout and (until == 8 or f"from step {until - 8}" in r.stderr)
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err[-2000:]
    ra, rb = logged(ref), logged(run)
    assert [x[0] for x in rb] == [x[0] for x in ra] == list(range(24))
    np.testing.assert_allclose(np.array(rb, dtype=float)[:, 1:], np.array(ra, dtype=float)[:, 1:], rtol=2e-5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "genesis_jax.generate",
            "--run",
            str(run),
            "--prompt",
            "In the",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
        env=devices_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.startswith("In the") and "step 24" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.eval", "--run", str(run), "--suite", "quick"],
        env=devices_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode in (0, 1) and "quick evaluation of" in r.stdout and "at step 24" in r.stdout, r.stderr[-2000:]
    assert (run / "reports" / "eval_24_quick.json").is_file()
