"""Fault classes 3 and 6, resources that cannot fit and a platform that is not there: refused
in one line naming the knob and the estimate (or the platform) before anything is allocated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import ROOT, exit_code, one_error_line, write_small_run_config
from flax import nnx

from genesis_jax import config as C, generate, train
from genesis_jax.core import cli
from genesis_jax.model import memory as budget
from genesis_jax.model.llama import Llama
from genesis_jax.training import run


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.norm_type=deepnorm", "model.n_kv_heads=2"], ["model.preset=small", "model.intermediate_size=100"]],
)
def test_the_parameter_estimate_counts_what_the_model_holds(overrides):
    cfg = C.from_dict(C.apply_overrides({}, overrides))
    model = nnx.eval_shape(lambda: Llama(cfg.model, nnx.Rngs(0)))
    assert budget.parameter_count(cfg.model) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_a_refusal_names_the_largest_part_and_its_knobs():
    parts = {"a": (600, "knob.a"), "b": (500, "knob.b")}
    budget.refuse_if_over(parts, "work", have=(1100, "here"))  # fits exactly
    with pytest.raises(budget.ResourceError) as e:
        budget.refuse_if_over(parts, "work", have=(1099, "here"))
    assert (
        str(e.value)
        == "work needs at least 1.1 KB (600 B a, 500 B b), but here has 1.1 KB; the largest part is a: lower knob.a"
    )


@pytest.fixture(scope="module")
def small_run(fixture_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("res")
    cfg = write_small_run_config(base / "run.toml", fixture_corpus, 2, 0)
    assert train.main(["--config", str(cfg), "--run-dir", str(base / "run")]) == 0
    return base


@pytest.mark.parametrize(
    "override, knob",
    [
        ("training.batch_size=2000000000", "training.batch_size"),
        ("data.seq_len=2000000000", "data.seq_len"),
        ("training.grad_accum_steps=2000000000", "training.grad_accum_steps"),
        ("model.dim=1000000", "model.dim"),
        ("model.n_layers=2000000000", "model.n_layers"),
        ("model.intermediate_size=2000000000", "model.intermediate_size"),
        ("mtl.head_dim=2000000000", "mtl.head_dim"),
        ("mtl.max_len=2000000000", "mtl.max_len"),
    ],
)
def test_training_that_cannot_fit_is_refused_before_allocating(small_run, override, knob, capsys, tmp_path):
    extra = ["--set", "model.n_heads=1", "--set", "model.n_kv_heads=1"] if "model.dim" in override else []
    extra += ["--set", "mtl.enabled=true"] if override.startswith("mtl.") else []
    code = train.main(
        ["--config", str(small_run / "run.toml"), "--run-dir", str(tmp_path / "r"), "--set", override, *extra]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "training needs at least" in line and knob in line.rsplit("lower", 1)[1], line
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "args, knob",
    [
        (["--num-samples", "100000000"], "--num-samples"),
        (["--num-samples", "1000000", "--max-tokens", "65536"], "--num-samples or --max-tokens"),
        (["--num-samples", "200000", "--prompt-file"], "the prompt's length"),
    ],
)
def test_generation_that_cannot_fit_is_refused_before_allocating(small_run, args, knob, capsys, tmp_path):
    if args[-1] == "--prompt-file":
        args = args[:-1] + ["--prompt", "a" * 60000]
    else:
        args = args + ["--prompt", "In the beginning"]
    assert exit_code(generate.main, ["--run", str(small_run / "run"), *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "needs at least" in line and knob in line, line


def test_generation_that_fits_runs(small_run, capsys):
    assert (
        generate.main(["--run", str(small_run / "run"), "--prompt", "In", "--num-samples", "3", "--max-tokens", "4"])
        == 0
    )


def test_an_allocation_that_fails_all_the_same_is_one_line(capsys):
    def body() -> int:
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 12345 bytes.\nmore detail")

    assert cli.run_cli("genesis_jax.demo", body, devices=False) == 2
    assert "out of memory on the device (RESOURCE_EXHAUSTED" in one_error_line(capsys.readouterr().err)


def test_the_host_memory_is_known_here():
    have = budget.host_available()
    assert have is None or have > 2**20


COMMANDS = {
    "train": ["genesis_jax.train", "--config", "CFG", "--run-dir", "RUN"],
    "generate": ["genesis_jax.generate", "--run", "RUN", "--prompt", "x"],
    "eval": ["genesis_jax.eval", "--run", "RUN", "--suite", "quick"],
}
CASES = [("train", "cuda"), ("generate", "tpu"), ("eval", "nonsense")]


@pytest.fixture(scope="module")
def platform_runs(small_run: Path) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Each command under each JAX_PLATFORMS, started side by side."""
    procs = {}
    for name, platform in CASES:
        argv = [
            x.replace("CFG", str(small_run / "run.toml")).replace("RUN", str(small_run / "run")) for x in COMMANDS[name]
        ]
        procs[name, platform] = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": platform, "PYTHONPATH": str(ROOT)},
        )
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("command, platform", CASES)
def test_a_platform_that_is_not_there_is_one_line(platform_runs, command, platform):
    r = platform_runs[command, platform]
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and f"JAX_PLATFORMS={platform}: cannot start it on this machine" in line, r.stderr[-2000:]


def test_an_evaluation_longer_than_any_verse_reads_the_verses(small_run, tmp_path, capsys):
    """eval.embed_len beyond every verse is padding: it costs nothing instead of a host array
    of keys x 2**31 bytes in the middle of training."""
    code = train.main(
        [
            "--config",
            str(small_run / "run.toml"),
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "eval.interval=2",
            "--set",
            "eval.embed_len=2147483647",
            "--set",
            "eval.alignment_keys=4",
            "--set",
            "eval.val_windows=4",
            "--set",
            "eval.reconstruction_windows=4",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_a_config_that_is_not_a_regular_file_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "run.toml")
    assert train.main(["--config", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "not a regular file" in one_error_line(capsys.readouterr().err)


def test_running_out_of_memory_in_training_is_one_line_exit_2_and_keeps_the_run(
    small_run, tmp_path, capsys, monkeypatch
):
    def exhausted(*args: object) -> None:
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.\ndetail")

    monkeypatch.setattr(run, "compile_step", lambda *a, **k: exhausted)
    code = train.main(["--config", str(small_run / "run.toml"), "--run-dir", str(tmp_path / "r")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "out of memory on the device after step 0 (RESOURCE_EXHAUSTED" in line, line
    assert "traceback" not in line and (tmp_path / "r" / "metrics.sqlite").is_file()
