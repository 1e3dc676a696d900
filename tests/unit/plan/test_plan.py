"""`python -m genesis_jax.plan` and the deviceless GPU compile under it.

The parsing tests run everywhere. The compile tests (marked `gpu_compile`) need the `plan`
extra (JAX's CUDA plugin and ptxas; no GPU): they build sm_90a code for the flash-attention
kernel and whole train steps on this CPU, and CI runs them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import (
    ROOT,  # noqa: E402
    compiles,
    exit_code,
)

from genesis_jax.core.compat import thunk_launches
from genesis_jax.plan import resources, target as targets
from genesis_jax.plan.__main__ import main as plan_main
from genesis_jax.plan.compile import JobResult, run

PTXAS_LOG = """I1130 15:24:43.160571 31978 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'genesis_flash_dq' for 'sm_90a'
ptxas info    : Function properties for genesis_flash_dq
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 136 registers, used 1 barriers
I1130 15:24:43.194785 31978 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_reduce_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_reduce_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 0 barriers
"""


def test_ptxas_log_is_read_per_kernel():
    k = resources.ptxas_report(PTXAS_LOG)
    assert set(k) == {"genesis_flash_dq", "loop_reduce_fusion"}
    dq = k["genesis_flash_dq"]
    assert (dq.registers, dq.stack, dq.spill_stores, dq.spill_loads, dq.target) == (136, 8, 16, 24, "sm_90a")
    assert dq.spills and not k["loop_reduce_fusion"].spills


def test_resident_blocks_per_sm_by_hand():
    # 166 registers -> 5312 per warp -> 5376 allocated; 8 warps: 43008 of 65536 -> 1 block.
    assert resources.Kernel("a", registers=166, threads=256, shared_memory=32768).blocks_per_sm() == 1
    # 128 registers x 4 warps = 16384 -> 4 blocks by registers; 64 KiB (+1 KiB) -> 3 by shared memory.
    assert resources.Kernel("b", registers=128, threads=128, shared_memory=65536).blocks_per_sm() == 3
    # 170 registers -> 5440 per warp, allocated in 256s: 5632; x 4 warps = 22528 -> 2 blocks (3 unrounded).
    assert resources.Kernel("r", registers=170, threads=128, shared_memory=0).blocks_per_sm() == 2
    # 32 registers x 2 warps: 32 by registers, 227 by shared memory, 2048 / 64 = 32 by threads.
    assert resources.Kernel("c", registers=32, threads=64, shared_memory=0).blocks_per_sm() == 32


def test_thunk_launches_are_read_in_each_jax_versions_format():
    """The thunk-sequence line of one launch as JAX 0.10/0.11 and as JAX 0.12 write it."""
    old = (
        "001: kCustomKernel [source | next=002 (1)] genesis_flash_fwd grid: [2, 2, 8] threads: [256, 1, 1]  "
        "shared_memory: 66048 bytes"
    )
    new = (
        "    001: kCustomKernel [source       | next=002 (1)] kernel=genesis_flash_fwd, profile_annotation="
        "pallas_call.8, launch dimensions=blocks: {2, 2, 8}, threads/block: {256, 1, 1}, cluster_dim=nullopt, "
        "shmem_bytes=66048, use_pdl=true"
    )
    for text in (old, new):
        assert list(thunk_launches(text)) == [("genesis_flash_fwd", (2, 2, 8), (256, 1, 1), 66048)]


def test_dump_files_give_launch_shapes_pallas_calls_and_largest_temporaries(tmp_path: Path):
    (tmp_path / "module_0001.jit_step.thunk_sequence.txt").write_text(
        "001: kCustomKernel [source | next=002 (1)] genesis_flash_fwd grid: [8, 2, 8] threads: [256, 1, 1]  "
        "shared_memory: 98304 bytes\n"
        "002: kCustomKernel [prev=001 (1) | sink] loop_reduce_fusion grid: [2048, 1, 1] threads: [128, 1, 1]  "
        "shared_memory: 0 bytes\n"
    )
    (tmp_path / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations.txt").write_text(
        '  %pallas_call.8 = (bf16[2,8]{1,0}) custom-call(%q.1), custom_call_target="__gpu$xla.gpu.triton", '
        'backend_config={grid_x = 8 : i32, name = \\"genesis_flash_fwd\\", num_warps = 8 : i32}, '
        'metadata={op_name="jit(step)/while/body/closed_call/jvp()/attn/genesis_flash_fwd/pallas_call"}\n'
        '  %fusion.3 = f32[40,64]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/while/body/mlp/dot_general"}\n'
    )
    (tmp_path / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n"
        " value: <1 p.1 @0> (size=64,offset=0): f32[16]{0}\n"
        "allocation 1: size 30000, preallocated-temp:\n"
        " value: <2 fusion.3 @0> (size=10240,offset=0): f32[40,64]{1,0}\n"
        " value: <3 fusion.3{1} @0> (size=10240,offset=10240): f32[40,64]{1,0}\n"
        " value: <6 copy.1 @0> (size=10240,offset=10240): f32[40,64]{1,0}\n"  # the same buffer, later
        " value: <4 pallas_call.8{} @0> (size=24,offset=20480): (bf16[2,8]{1,0})\n"
        " value: <5 pallas_call.8{0} @0> (size=9000,offset=20504): bf16[2,8]{1,0}\n"
    )
    ks = {k.name: k for k in resources.kernels(PTXAS_LOG, tmp_path)}
    fwd = ks["genesis_flash_fwd"]
    assert fwd.pallas and (fwd.grid, fwd.threads, fwd.shared_memory) == ((8, 2, 8), 256, 98304)
    assert not ks["loop_reduce_fusion"].pallas and ks["genesis_flash_dq"].registers == 136
    largest = resources.largest_temporaries(tmp_path)
    assert largest[0] == {"bytes": 10240, "count": 2, "shape": "f32[40,64]", "op": "while/body/mlp/dot_general"}
    assert largest[1]["shape"] == "bf16[2,8]" and largest[1]["op"].endswith("genesis_flash_fwd/pallas_call")
    assert len(largest) == 2  # the parameter and the tuple's index table are not temporaries


def test_missing_toolchain_is_one_line_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    code = plan_main(["--config", str(ROOT / "configs" / "gpu_bench.toml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert (
        "CUDA plugin" in err and f"jax[cuda13-local]=={targets.jaxlib_version()}" in err and "nvidia-cuda-nvcc" in err
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "a100"], "--target 'a100': expected one of h100, h200, local"),
        (["--devices", "0"], "argument --devices: 0: expected an integer within [1, 2**31 - 1]"),
        (["--set", "model.atention=pallas"], "unknown config key model.atention"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    code = exit_code(plan_main, ["--config", str(ROOT / "configs" / "gpu_bench.toml"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_target_local_without_a_gpu_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU: --target local compiles for it")
    code = plan_main(["--config", str(ROOT / "configs" / "tiny.toml"), "--target", "local"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "error: --target local: 0 GPU(s) here, 1 asked for (use --target h100 or h200 to compile for absent GPUs)"
    )


# -- compiled for sm_90a --------------------------------------------------------------------


def kernel_job(
    dtype: str, hd: int, causal: bool = True, segments: bool = True, heads: tuple[int, int] = (8, 4), seq: int = 1000
) -> dict[str, object]:
    """Forward and backward (the gradient's program holds all three kernels) at the default
    block sizes; a length that is no block multiple."""
    return {
        "kind": "attention",
        "shape": [2, seq, seq, *heads, hd],
        "dtype": dtype,
        "causal": causal,
        "segments": segments,
    }


KERNEL_JOBS = {
    # causal, segments, GQA 2:1: every row of the default block-size tables, fp16 at 64 and 128
    **{f"{dtype}-hd{hd}": kernel_job(dtype, hd) for dtype in ("bfloat16", "float32") for hd in (32, 64, 128, 256)},
    **{f"float16-hd{hd}": kernel_job("float16", hd) for hd in (64, 128)},
    "bfloat16-hd128-plain-gqa4": kernel_job("bfloat16", 128, causal=False, segments=False, heads=(8, 2), seq=512),
    "bfloat16-hd24-padded": kernel_job("bfloat16", 24, heads=(12, 12), seq=300),
}


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, JobResult]:
    compiled = run(list(KERNEL_JOBS.values()), "h200")
    return dict(zip(KERNEL_JOBS, compiled.results))


@compiles
@pytest.mark.parametrize("name", list(KERNEL_JOBS))
def test_kernel_compiles_for_sm90a_without_spills(name: str, kernel_results: dict[str, JobResult]):
    r = kernel_results[name]
    assert r.ok, r.error
    ks = {k["name"]: k for k in r.kernels()}
    assert set(ks) == {"genesis_flash_fwd", "genesis_flash_dq", "genesis_flash_dkv"}
    for k in ks.values():
        assert k["target"] == "sm_90a", k
        assert k["registers"] is not None and k["registers"] <= 255, k
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        assert 0 < k["shared_memory"] <= 232448, k  # H100/H200 opt-in shared memory per block


MOSAIC_JOBS = {
    f"{dtype}-hd{hd}": {**kernel_job(dtype, hd), "kernel": "flash_attention_mgpu"}
    for dtype in ("bfloat16", "float16")
    for hd in (64, 128)
}
MOSAIC_KERNELS = {f"genesis_flash_mgpu_{k}_mosaic_gpu_kernel" for k in ("fwd", "dq", "dkdv")}


@pytest.fixture(scope="module")
def mosaic_results() -> dict[str, JobResult]:
    return dict(zip(MOSAIC_JOBS, run(list(MOSAIC_JOBS.values()), "h200").results))


def mosaic_tile_bytes(kernel: str, hd: int, itemsize: int = 2) -> tuple[int, int, int]:
    """Bytes of the tiles a Mosaic kernel must hold in shared memory at the default blocks, by
    hand from the design (kernels/README.md), and its grid size for MOSAIC_JOBS' shape: fwd
    Q per compute warpgroup and the K/V ring; dq Q and dO per compute warpgroup and the K/V
    ring; dk/dv K and V per compute warpgroup and the Q/dO ring (P and dS stay in registers)."""
    from genesis_jax.kernels.mosaic.forward import MosaicBlocks

    blocks = MosaicBlocks()
    bq, bk, stages, bqk = blocks.block_q, blocks.block_k, blocks.stages, blocks.block_q_dkv
    batch, seq, heads_q, heads_kv = 2, 1000, 8, 4
    part = kernel.removeprefix("genesis_flash_mgpu_").removesuffix("_mosaic_gpu_kernel")
    wgs = blocks.compute_wgs if part == "fwd" else blocks.compute_wgs_bwd
    elements = {
        "fwd": wgs * bq * hd + 2 * stages * bk * hd,
        "dq": wgs * 2 * bq * hd + 2 * stages * bk * hd,
        "dkdv": wgs * 2 * bk * hd + 2 * stages * bqk * hd,
    }[part]
    rows = wgs * (bk if part == "dkdv" else bq)
    grid = batch * -(-seq // rows) * (heads_kv if part == "dkdv" else heads_q)
    return elements * itemsize, grid, 128 * (wgs + 1)


@compiles
@pytest.mark.parametrize("name", list(MOSAIC_JOBS))
def test_mosaic_kernels_compile_for_sm90a_without_spills(name: str, mosaic_results: dict[str, JobResult]):
    """The Mosaic GPU kernels (causal, segments, GQA 2:1, a length that is no tile multiple)
    compile to machine code, forward and backward; ptxas names them after the kernel bodies.
    Their launch (grid, threads, dynamic shared memory) is read from the kernel module: shared
    memory holds the tiles plus at most 8 KiB of barriers, segments and row statistics; every
    kernel runs two compute warpgroups and a memory one."""
    r = mosaic_results[name]
    assert r.ok, r.error
    ks = {k["name"]: k for k in r.kernels()}
    hd = r.job["shape"][-1]
    assert set(ks) == MOSAIC_KERNELS
    for k in ks.values():
        assert k["target"] == "sm_90a" and k["registers"] is not None and k["registers"] <= 255, k
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        tiles, grid, threads = mosaic_tile_bytes(k["name"], hd)
        assert tiles <= k["shared_memory"] <= tiles + 8192, (tiles, k)
        assert k["threads"] == threads and k["grid"][0] * k["grid"][1] * k["grid"][2] == grid, k
        assert k["blocks_per_sm"] >= 1, k


def plan_cli(capsys: pytest.CaptureFixture[str], corpus: Path, *args: str) -> tuple[int, str]:
    code = plan_main(["--config", str(ROOT / "configs" / "gpu_bench.toml"), "--set", f"data.corpus={corpus}", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


@compiles
def test_every_shipped_gpu_config_fits_an_h200(fixture_corpus: Path, capsys: pytest.CaptureFixture[str]):
    import tomllib

    gpu_configs = [
        p
        for p in sorted((ROOT / "configs").glob("*.toml"))
        if tomllib.loads(p.read_text())["model"].get("attention", "xla") != "xla"
    ]
    assert gpu_configs, "no shipped config targets a GPU"
    for path in gpu_configs:
        code = plan_main(["--config", str(path), "--set", f"data.corpus={fixture_corpus}", "--target", "h200"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "attention pallas" in out and ": fits" in out and "genesis_flash_dkv" in out


@pytest.fixture(scope="module")
def sharded_mosaic_plan(fixture_corpus: Path) -> tuple[int, str, dict]:
    """One plan (its compile is the costly part) for two tests: preset `test` with the Mosaic
    kernels, RMSNorm, on data 1 x fsdp 2 (exit code, printed report, --json document)."""
    out_json = fixture_corpus.parent / "plan_sharded_mosaic.json"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
        code = plan_main(
            [
                "--config",
                str(ROOT / "configs" / "gpu_bench.toml"),
                "--set",
                f"data.corpus={fixture_corpus}",
                "--set",
                "model.preset=test",
                "--set",
                "model.norm_type=rmsnorm",
                "--set",
                "model.attention=mosaic",
                "--set",
                "parallel.data=1",
                "--set",
                "parallel.fsdp=2",
                "--set",
                "training.batch_size=4",
                "--json",
                str(out_json),
            ]
        )
    return code, out.getvalue(), json.loads(out_json.read_text()) if code == 0 else {}


@compiles
def test_a_train_step_with_the_mosaic_kernels_compiles_for_sm90a(sharded_mosaic_plan: tuple[int, str, dict]):
    """The Mosaic kernels inside the model (layer scan, bf16, head_dim 8 padded to 64, per shard
    under fsdp) in the whole train step, reported with their launch figures in the kernel table."""
    code, out, _ = sharded_mosaic_plan
    assert code == 0, out
    assert "attention mosaic" in out and "verdict: fits" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if "_mosaic_gpu_kernel" in line}
    assert set(table) == MOSAIC_KERNELS, out
    for name, (*_, shared_kib, threads, blocks) in table.items():
        assert 0 < float(shared_kib) <= 227 and int(threads) in (256, 384) and int(blocks) >= 1, (name, out)


@compiles
def test_an_oversized_config_does_not_fit_and_exits_1(fixture_corpus: Path, capsys: pytest.CaptureFixture[str]):
    # logits alone: 32768 x 2048 x 260 float32 = 65 GiB (flattened to 67108864 rows), several times over.
    code, out = plan_cli(
        capsys,
        fixture_corpus,
        "--set",
        "model.preset=test",
        "--set",
        "training.batch_size=32768",
        "--set",
        "data.seq_len=2048",
    )
    assert code == 1, out
    assert "DOES NOT FIT" in out and "verdict: needs" in out and "f32[67108864,260]" in out


@compiles
def test_sharded_state_per_device_matches_the_hand_count(sharded_mosaic_plan: tuple[int, str, dict]):
    """Preset `test` (dim 32, 2 layers, SwiGLU 64, RMSNorm, tied 260-byte embedding): 28,960
    float32 parameters. Under fsdp = 2 every matrix is split in two; the 5 norm scales are not."""
    n_params, norms = 260 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32, 5 * 32
    assert n_params == 28960
    code, out, plan = sharded_mosaic_plan
    assert code == 0, out
    info = plan["job"]["info"]
    assert plan["devices"] == 2 and info["n_parameters"] == n_params
    assert info["parameters"] == 4 * ((n_params - norms) // 2 + norms)
    assert info["optimizer"] >= 2 * info["parameters"]  # Adam's two moments, sharded alike
    assert info["batch_bytes"] == 2 * (512 * 9 + 4)  # 2 rows per device of 512 tokens: int32 x 2 + bool, a locale


@compiles
def test_the_json_plan_carries_the_speed_prediction_with_the_sharded_steps_collectives(
    sharded_mosaic_plan: tuple[int, str, dict],
):
    """fsdp = 2: parameters are gathered and gradients reduced between the two devices, so the
    prediction has collective time; the Mosaic kernels' calls are timed as attention."""
    code, out, plan = sharded_mosaic_plan
    assert code == 0, out
    speed = plan["speed"]
    train = speed["train"]
    assert train["collective_s"] > 0 and train["attention_s"] > 0 and train["gemm_s"] > 0
    parts = ("gemm_s", "attention_s", "memory_s", "collective_s", "launch_s")
    assert train["device_s"] == pytest.approx(sum(train[k] for k in parts))
    assert speed["step_s"] == max(train["device_s"], 4.1e-4)  # the host loop's measured time per step
    assert speed["tokens_per_step"] == 4 * 512 and speed["tokens_per_s"] == pytest.approx(4 * 512 / speed["step_s"])
    assert "speed on NVIDIA H200" in out and f"MFU {speed['mfu']:.1%}" in out
    kernels = {a["kernel"] for a in plan["job"]["programs"][0]["profile"]["attention"]}
    assert kernels == {"genesis_flash_mgpu_fwd", "genesis_flash_mgpu_dq", "genesis_flash_mgpu_dkdv"}


@compiles
def test_a_mesh_the_batch_cannot_split_is_a_usage_error(fixture_corpus: Path, capsys: pytest.CaptureFixture[str]):
    code, out = plan_cli(capsys, fixture_corpus, "--set", "parallel.data=2", "--set", "training.batch_size=3")
    assert code == 2 and "training.batch_size = 3 is not divisible" in out


def test_plan_off_linux_x86_64_says_where_it_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(targets.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(targets.sys, "platform", "darwin")
    code = plan_main(["--config", str(ROOT / "configs" / "gpu_bench.toml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Linux x86_64 only" in err and "darwin arm64" in err
