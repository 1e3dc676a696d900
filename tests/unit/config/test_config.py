import subprocess
import sys

import pytest
from conftest import ROOT

from genesis_jax import config as C
from genesis_jax.core.errors import ConfigError


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = C.load(path)
    assert cfg.model.dim % cfg.model.n_heads == 0
    # The resolved config written into a run directory loads back to the same config.
    assert C.from_dict(__import__("tomllib").loads(C.to_toml(cfg))) == cfg


def test_presets_and_overrides():
    cfg = C.from_dict({"model": {"preset": "microscope"}})
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.intermediate_size) == (288, 144, 12, 768)
    cfg = C.from_dict(
        C.apply_overrides(
            {"model": {"preset": "standard"}},
            [
                "model.intermediate_size=auto",
                "model.n_kv_heads=2",
                "optim.lr=1",
                'data.locales=["en", "fr"]',
                "model.remat=true",
                "data.corpus=123",
            ],
        )
    )
    assert cfg.model.intermediate_size == 4 * 512 and cfg.model.n_kv_heads == 2
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.locales == ["en", "fr"] and cfg.model.remat is True
    assert cfg.data.corpus == "123"  # a string key keeps a numeric-looking path as text


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"modle": {}}, [], "unknown config section [modle] (did you mean 'model'?)"),
        ({"model": {"dimm": 3}}, [], "unknown config key model.dimm (did you mean 'dim'?)"),
        ({}, ["training.max_step=5"], "unknown config key training.max_step (did you mean 'max_steps'?)"),
        ({}, ["training.max_steps=ten"], "training.max_steps = 'ten': expected an integer"),
        ({}, ["training.max_steps=1.5"], "training.max_steps = 1.5: expected an integer"),
        ({"model": {"remat": "yes"}}, [], "model.remat = 'yes': expected true or false"),
        ({}, ["model.n_heads=5"], "model.n_heads = 5 does not divide model.dim = 64"),
        ({}, ["model.n_kv_heads=3"], "model.n_kv_heads = 3 does not divide model.n_heads = 4"),
        ({}, ["training.batch_size=0"], "training.batch_size = 0: expected an integer within [1, 2**31 - 1]"),
        ({}, ["optim.beta2=1.0"], "optim.beta2 = 1.0: expected a number within [0, 1)"),
        ({}, ["curriculum.loss_ema_decay=1.5"], "curriculum.loss_ema_decay = 1.5: expected a number within [0, 1]"),
        ({}, ["mtl.task_ema_decay=1.0"], "mtl.task_ema_decay = 1.0: expected a number within [0, 1)"),
        ({}, ["model.preset=huge"], "model.preset = 'huge': unknown preset"),
        ({}, ["nodot=1"], "expected section.key=value"),
        ({}, ["optim.lr=nan"], "optim.lr = nan: expected a finite number"),
        ({}, ["optim.eps=inf"], "optim.eps = inf: expected a finite number"),
        ({"optim": {"grad_clip": float("-inf")}}, [], "optim.grad_clip = -inf: expected a finite number"),
        ({}, ["training.seed=4294967296"], "training.seed = 4294967296: expected an integer within [0, 2**32 - 1]"),
        ({}, ["training.seed=-1"], "training.seed = -1: expected an integer within [0, 2**32 - 1]"),
        ({}, ["training.on_nonfinite=ignore"], "training.on_nonfinite = 'ignore': expected one of"),
        (
            {},
            ["training.max_steps=99999999999"],
            "training.max_steps = 99999999999: expected an integer within [1, 2**31 - 1]",
        ),
        ({}, ["model.dim=3000000000"], "model.dim = 3000000000: expected an integer within [1, 2**31 - 1]"),
        ({}, ["optim.lr=1e39"], "optim.lr = 1e+39: expected a number within (0, 3.4e38]"),
        ({}, ["data.mask_id=260"], "data.mask_id = 260: expected an integer within [0, 259]"),
        ({}, ["training.rollback_lr_scale=0"], "training.rollback_lr_scale = 0.0: expected a number within (0, 1]"),
    ],
)
def test_config_errors_name_the_key(raw, overrides, message):
    with pytest.raises(ConfigError) as e:
        C.from_dict(C.apply_overrides(raw, overrides))
    assert message in str(e.value)


class FakeMesh:
    def __init__(self, shape):
        self.shape = shape


def test_batch_not_divisible_by_devices():
    from genesis_jax.parallel.sharding import check_devices

    cfg = C.from_dict({"training": {"batch_size": 6}})
    with pytest.raises(
        ConfigError, match="training.batch_size = 6 is not divisible by parallel.data x parallel.fsdp = 4"
    ):
        check_devices(cfg.training.batch_size, cfg.model, FakeMesh({"data": 4, "fsdp": 1, "tensor": 1}))


def test_diff_lists_changes():
    a = C.to_dict(C.from_dict({}))
    b = C.to_dict(C.from_dict({"optim": {"lr": 0.5}}))
    assert C.diff(a, b) == ["optim.lr: 0.003 -> 0.5"]


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layer = 2\n")
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.train", "--config", str(bad), "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key model.n_layer (did you mean 'n_layers'?)"
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.train", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "config file not found" in r.stderr
    # a backend is checked against the registry (model/attention.py) before anything is written
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "genesis_jax.train",
            "--config",
            str(ROOT / "configs" / "tiny.toml"),
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "model.attention=palas",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and not (tmp_path / "r").exists()
    assert r.stderr.strip().startswith("error: model.attention = 'palas': expected one of 'xla', ")
    assert r.stderr.strip().endswith("(did you mean 'pallas'?)")


def test_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty config"):
        C.load(empty)
    # Overrides alone on an empty file are still refused: the file was meant to say something.
    with pytest.raises(ConfigError, match="empty config"):
        C.load(empty, ["training.max_steps=3"])
