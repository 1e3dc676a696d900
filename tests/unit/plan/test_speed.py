"""`plan`'s speed prediction: the HLO reader against hand counts, the rates against their anchors,
the calibration file, and (with the `plan` extra) predictions for compiled train steps that must
move the way the hardware would: twice the batch, twice the GEMM and attention time; remat, more
FLOPs; `standard` at 2048 tokens on an H200 inside the MFU band of small models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import ROOT, compiles

from genesis_jax.core.errors import UserError
from genesis_jax.plan import hlo, rates as R, speed
from genesis_jax.plan.compile import JobResult, run

HLO = (Path(__file__).parent / "hand_counted.hlo").read_text()  # a module small enough to count by hand


def test_hlo_reader_counts_loop_bodies_by_their_trip_counts_and_moves_only_slices():
    p = hlo.profile(HLO, devices=2).to_json()
    # The GEMM sits in a 4-trip loop inside a 3-trip loop: 12 calls of 2*64*16*32 FLOPs, each
    # moving its operands and output (64x32 + 32x16 + 64x16 bf16).
    assert p["gemms"] == [{"batch": 1, "m": 64, "n": 16, "k": 32, "dtype": "bf16", "count": 12.0, "bytes": 12 * 7168}]
    # The update writes one 64x16 f32 slice of the 10-slice stack (not the stack), reading the
    # bf16 update and the index (3 calls); the slice reads one slice and writes it (12 calls);
    # the conditional's fusion (f32[8] in and out) runs in one of its two branches.
    update, take, branch = 4 + 2048 + 4096, 4096 + 4 + 4096, 64
    assert p["memory_bytes"] == 3 * update + 12 * take + branch / 2
    assert p["memory_launches"] == 3 + 12 + 0.5
    assert p["attention"] == [{"kernel": "genesis_flash_fwd", "q": [2, 128, 4, 32], "k": [2, 128, 4, 32], "count": 1.0}]
    assert p["collectives"] == [{"op": "all-reduce", "group": 2, "bytes": 1024}]
    assert p["launches"] == 12 + 3 + 12 + 0.5 + 1 + 1 and p["unknown_trips"] == 0


def test_hlo_reader_reads_jax_012s_tuple_elements_sliced_calls_and_mesh_groups():
    """JAX 0.12 writes a tuple's element as %name#index (no get-tuple-element), hands a Pallas
    call its slices inside a fusion, and names a collective's groups by mesh axes."""
    p = hlo.profile((Path(__file__).parent / "hand_counted_jax012.hlo").read_text(), devices=4).to_json()
    # The negation reads and writes f32[64,16] (the loop's element 1, not the whole tuple), 6 times.
    assert p["memory_bytes"] == 6 * 2 * 64 * 16 * 4 and p["memory_launches"] == 6
    kernel = "genesis_flash_mgpu_fwd"
    assert p["attention"] == [{"kernel": kernel, "q": [2, 128, 4, 32], "k": [2, 128, 4, 32], "count": 6.0}]
    # An all-gather over the fsdp axis of a data 2 x fsdp 2 mesh: groups of 2, its output gathered.
    assert p["collectives"] == [{"op": "all-gather", "group": 2, "bytes": 6 * 64 * 16 * 4}]
    assert p["launches"] == 6 * 3


def test_a_loop_without_a_known_trip_count_is_counted_once_and_said():
    p = hlo.profile(HLO.replace(',"known_trip_count":{"n":"4"}', "").replace('{"known_trip_count":{"n":"4"}}', "{}"))
    assert p.unknown_trips == 1 and next(iter(p.gemms.values()))["count"] == 3


def test_rates_follow_their_anchors():
    assert R.anchor(R.FA3_FORWARD, 2048) == pytest.approx(566e12)
    assert R.anchor(R.FA3_BACKWARD, 512) == pytest.approx(316e12)
    assert R.anchor(R.FA3_FORWARD, 2896) == pytest.approx((566e12 + 590e12) / 2, rel=1e-4)  # linear in log2
    assert R.anchor(R.FA3_BACKWARD, 65536) == pytest.approx(561e12)  # beyond the table: its last value
    assert R.anchor(R.FA3_BACKWARD, 256) == pytest.approx(316e12 - (424e12 - 316e12))  # the first slope
    assert R.anchor(R.FA3_BACKWARD, 8) == pytest.approx(316e12 / 4)  # floored
    # The exponential unit: 3.9e12 exp/s x 2 x head_dim x 2 matmuls in the forward.
    assert R.exp_cap(24, 2, R.Rates()) == pytest.approx(374.4e12)
    assert R.exp_cap(32, 2, R.Rates()) == pytest.approx(499.2e12)


def test_head_dim_24_gets_the_exponential_unit_cap():
    """With a kernel as fast as FA3 (fraction 1), head_dim 128 runs at the anchor, head_dim 24 and
    32 at the exponential unit's cap, whatever the length; a forward call's time is its FLOPs
    over that rate."""
    fa3 = R.Rates(attention_fraction={"forward": 1.0, "backward": 1.0})
    for seq in (2048, 8192):
        assert R.attention_rate("pallas", "forward", 128, seq, 2, fa3) == pytest.approx(R.anchor(R.FA3_FORWARD, seq))
        assert R.attention_rate("pallas", "forward", 24, seq, 2, fa3) == pytest.approx(3.9e12 * 2 * 24 * 2)
        assert R.attention_rate("pallas", "forward", 32, seq, 2, fa3) == pytest.approx(3.9e12 * 2 * 32 * 2)
    call = {"kernel": "genesis_flash_fwd", "q": [4, 8192, 12, 24], "k": [4, 8192, 12, 24], "count": 40}
    profile = {"gemms": [], "attention": [call], "memory_bytes": 0.0, "collectives": [], "launches": 0.0}
    h200 = speed.Device("H200", 132, 4.8e12)
    t = speed.program_time(profile, "pallas", h200, fa3)
    flops = 40 * 4.0 * 4 * 12 * 8192 * 8192 * 24 / 2  # causal forward: 2 matmuls over half the scores
    assert t.attention_flops == pytest.approx(flops)
    assert t.attention_s == pytest.approx(flops / 374.4e12)


def test_measured_attention_rates_replace_the_model_near_their_length():
    measured = R.Rates(attention_measured={"pallas/backward/64/2048": 123e12})
    assert R.attention_rate("pallas", "backward", 64, 4096, 3, measured) == 123e12  # within 2x
    assert R.attention_rate("pallas", "backward", 64, 8192, 3, measured) != 123e12  # beyond: the model
    assert R.attention_rate("mosaic", "backward", 64, 2048, 3, measured) != 123e12  # another kernel


def test_gemm_waves_by_hand():
    # 132 SMs, 128x128 tiles: 32768x512 -> 256 x 4 = 1024 tiles = 7.76 waves -> 8 waves.
    assert speed.wave_share(1, 32768, 512, 512, 132, 128) == pytest.approx(1024 / (8 * 132))
    # 512x512 output (16 tiles) with K = 32768: split-K up to ceil(132 / 16) = 9 -> 144 tiles, 2 waves.
    assert speed.wave_share(1, 512, 512, 32768, 132, 128) == pytest.approx(144 / 264)
    # Shallow K cannot be split: 16 tiles stay 16.
    assert speed.wave_share(1, 512, 512, 256, 132, 128) == pytest.approx(16 / 132)


def write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_a_calibration_file_replaces_the_constants_it_measured(tmp_path: Path):
    doc = {
        "device": "NVIDIA H100 80GB HBM3",
        "rates": {"gemm_efficiency": 0.61, "attention_fraction": {"backward": 0.4}, "host_step_s": 1e-4},
        "measured": {"gemm_rate": 6e14},
    }
    rates, measured = R.load_calibration(write(tmp_path / "c.json", doc))
    assert rates.gemm_efficiency == 0.61 and rates.host_step_s == 1e-4 and measured == {"gemm_rate": 6e14}
    assert rates.attention_fraction == {"forward": R.KERNEL_FRACTION, "backward": 0.4}
    assert rates.hbm_efficiency == R.Rates().hbm_efficiency  # not measured: the constant
    assert "calibrated: c.json (NVIDIA H100 80GB HBM3)" == rates.describe("gemm_efficiency")
    assert rates.describe("hbm_efficiency") == "uncalibrated"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("not json", "not a calibration file"),
        ({"rates": {"gemm_speed": 1.0}}, "rates.gemm_speed: not a calibrated rate"),
        ({"rates": {"gemm_efficiency": -1}}, "rates.gemm_efficiency = -1: expected positive numbers"),
        ({"rates": {"kernel_gap_s": "fast"}}, "expected positive numbers"),
        ({"rates": {"attention_fraction": {"forward": 0}}}, "expected positive numbers"),
        ([1, 2], "expected a JSON object with a 'rates' object"),
    ],
)
def test_a_bad_calibration_file_is_one_line(tmp_path: Path, content: object, message: str):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError) as e:
        R.load_calibration(path)
    assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


STANDARD = ["model.preset=standard", "data.seq_len=2048", "model.attention=pallas"]


@pytest.fixture(scope="module")
def standard_plans(fixture_corpus: Path) -> dict[str, JobResult]:
    """`standard` at 2048 tokens for one H200: 8 sequences, 16, and 8 with remat, compiled in one
    compiler process."""
    config = str(ROOT / "configs" / "gpu_bench.toml")
    base = [*STANDARD, f"data.corpus={fixture_corpus}"]
    sets = {
        "b8": [*base, "training.batch_size=8"],
        "b16": [*base, "training.batch_size=16"],
        "b8-remat": [*base, "training.batch_size=8", "model.remat=true"],
    }
    c = run([{"kind": "train", "config": config, "set": s} for s in sets.values()], "h200")
    return {name: r for name, r in zip(sets, c.results, strict=True)}


H200 = speed.Device("NVIDIA H200", 132, 4.8e12)


def predicted(r: JobResult) -> speed.Prediction:
    assert r.ok, r.error
    return speed.predict(r.programs, r.info, H200, R.Rates())


@compiles
def test_doubling_the_batch_doubles_gemm_and_attention_time(standard_plans: dict[str, JobResult]):
    one, two = predicted(standard_plans["b8"]).train, predicted(standard_plans["b16"]).train
    assert two.attention_flops == pytest.approx(2 * one.attention_flops)
    assert two.attention_s == pytest.approx(2 * one.attention_s)
    assert two.gemm_flops == pytest.approx(2 * one.gemm_flops, rel=0.01)  # the head's and norms' GEMMs included
    assert 1.9 <= two.gemm_s / one.gemm_s <= 2.1
    assert 1.8 <= two.memory_bytes / one.memory_bytes <= 2.05  # weights and optimizer do not double


@compiles
def test_remat_predicts_more_flops(standard_plans: dict[str, JobResult]):
    """Recomputing each block in the backward pass executes its forward twice: 8/6 of the GEMM
    FLOPs of the blocks, and one more attention forward (2 of the 9 matmuls per score)."""
    plain, remat = predicted(standard_plans["b8"]).train, predicted(standard_plans["b8-remat"]).train
    assert 1.25 <= remat.gemm_flops / plain.gemm_flops <= 1.34
    assert remat.attention_flops / plain.attention_flops == pytest.approx(11 / 9)


@compiles
def test_standard_on_an_h200_at_2048_tokens_lands_in_the_small_model_mfu_band(standard_plans: dict[str, JobResult]):
    r = standard_plans["b16"]
    p = predicted(r)
    # flops.py's model FLOPs: 6 x matmul parameters + 3 x causal attention, per token.
    dim, layers, ffn, vocab, seq = 512, 12, 2048, 260, 2048
    per_token = 6 * (layers * (4 * dim * dim + 3 * dim * ffn) + vocab * dim) + 3 * layers * 2 * seq * dim
    assert p.model_flops_per_step == pytest.approx(per_token * 16 * seq)
    assert p.tokens_per_s == pytest.approx(16 * seq / p.step_s)
    assert p.mfu == pytest.approx(p.model_flops_per_step / p.step_s / 989.4e12)
    assert R.MFU_BAND[0] <= p.mfu <= R.MFU_BAND[1] and p.in_band, p.mfu
    assert not p.host_bound
    text = "\n".join(speed.lines(p, H200, R.Rates()))
    assert f"MFU {p.mfu:.1%} (inside the 20%-45% band" in text and "uncalibrated constants" in text
    assert math.isclose(p.run_s, 1000 * p.step_s)  # gpu_bench.toml: 1000 steps, no validation


def test_calibration_reads_our_kernels_rates_from_the_attention_table(tmp_path: Path):
    """benchmarks/calibrate.py turns benchmarks/attention.py's rows into rates: the forward's
    FLOPs over its time, the backward's executed FLOPs (3.5 x the forward's, dq and dkv kernels)
    over the fwd+bwd time less the forward's; the share of FA3's anchor from head_dim >= 64."""
    from benchmarks.calibrate import attention_rates

    head = "backend,mode,name,batch,seq,heads_q,heads_kv,head_dim,causal,ms,tflops,pct_matmul,rel_err,error\n"
    rows = [
        "pallas,fwd,fa-grid,8,2048,16,16,128,True,1.0,,,,",
        "pallas,fwd+bwd,fa-grid,8,2048,16,16,128,True,3.0,,,,",
        "pallas,fwd,standard,32,512,12,12,32,True,0.5,,,,",
        "reference,fwd,fa-grid,8,2048,16,16,128,True,9.0,,,,",
        "mosaic,fwd,fa-grid,8,2048,16,16,128,True,,,,,RuntimeError: refused",
    ]
    path = tmp_path / "attention.csv"
    path.write_text(head + "\n".join(rows) + "\n")
    measured, fraction = attention_rates(path)
    flops = 4.0 * 8 * 16 * 2048 * 2048 * 128 / 2
    assert measured["pallas/forward/128/2048"] == pytest.approx(flops / 1e-3)
    assert measured["pallas/backward/128/2048"] == pytest.approx(3.5 * flops / 2e-3)
    assert measured["pallas/forward/32/512"] == pytest.approx(4.0 * 32 * 12 * 512 * 512 * 32 / 2 / 0.5e-3)
    assert set(measured) == {"pallas/forward/128/2048", "pallas/backward/128/2048", "pallas/forward/32/512"}
    assert fraction == pytest.approx({"forward": flops / 1e-3 / 566e12, "backward": 3.5 * flops / 2e-3 / 501e12})


def test_a_local_gpu_finds_its_spec_by_name():
    from genesis_jax.plan import target as targets

    assert targets.for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert targets.for_device_kind("NVIDIA H200").name == "h200"  # the SXM part as some drivers name it
    assert targets.for_device_kind("NVIDIA H100 PCIe") is None  # 114 SMs, 2 TB/s: not the SXM spec
    assert targets.for_device_kind("NVIDIA A100-SXM4-80GB") is None and targets.for_device_kind("cpu") is None


def test_a_host_bound_step_and_unknown_loop_counts_are_said():
    """A program too small to hide the host's work per step runs at the host's pace; loops whose
    trip count the HLO does not give are counted once, and the table says so."""
    prof = {"gemms": [], "attention": [], "memory_bytes": 1e6, "collectives": [], "launches": 10.0, "unknown_trips": 2}
    info = {"attention": "pallas", "tokens_per_step": 1000, "model_flops_per_token": 1e6, "devices": 1}
    info |= {"max_steps": 100, "val_interval": 50, "val_windows": 5, "batch_size": 2}
    h200, rates = speed.Device("H200", 132, 4.8e12), R.Rates()
    p = speed.predict([{"profile": prof}, {"profile": prof}], info, h200, rates)
    device = 1e6 / (4.8e12 * rates.hbm_efficiency) + 10 * rates.kernel_gap_s
    assert p.train.device_s == pytest.approx(device) and device < rates.host_step_s
    assert p.step_s == rates.host_step_s and p.host_bound
    # 2 validations of ceil(5 / 2) = 3 calls each, at the host's pace too.
    assert (p.validations, p.validation_calls) == (2, 3)
    assert p.run_s == pytest.approx(100 * rates.host_step_s + 6 * rates.host_step_s)
    text = "\n".join(speed.lines(p, h200, rates))
    assert "the host is slower: it sets the pace" in text and "2 loops without a known trip count" in text
