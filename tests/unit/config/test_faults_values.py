"""Fault class 2, numbers the program cannot hold: every numeric config key and command-line flag
has a range (genesis_jax/config/ranges.py) derived from the type that carries it to the device. Random
values (huge, negative, non-finite, of the wrong type) end in exit 2 and one line naming the key or
flag, or are accepted inside the carrier's range; values at the ranges' ends train."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sqlite3
import sys
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, one_error_line, write_small_run_config
from hypothesis import HealthCheck, given, settings, strategies as st

from genesis_jax import config as C
from genesis_jax.config.ranges import FLOAT32_MAX, INT32_MAX, UINT32_MAX, Range
from genesis_jax.core import cli
from genesis_jax.core.errors import ConfigError

COMMANDS = ["train", "generate", "eval", "export", "report", "verify", "corpus.__main__", "plan.__main__"]
BENCHMARKS = ["attention", "kernel_resources", "profile_step", "torch_step", "train_step"]


def union_members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def numeric_keys() -> dict[str, Range]:
    """Every config key whose value is a number, with its declared range."""
    out = {}
    for section, cls in C.SECTIONS.items():
        for key, tp in typing.get_type_hints(cls, include_extras=True).items():
            for m in union_members(tp):
                if typing.get_origin(m) is typing.Annotated:
                    out[f"{section}.{key}"] = typing.get_args(m)[1]
    return out


def test_every_numeric_key_has_a_range():
    plain = [
        f"{s}.{k}"
        for s, cls in C.SECTIONS.items()
        for k, tp in typing.get_type_hints(cls, include_extras=True).items()
        if {int, float} & set(union_members(tp))
    ]
    assert not plain, f"numeric keys without a range: {plain}"
    assert len(numeric_keys()) >= 80


HOSTILE = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([INT32_MAX, INT32_MAX + 1, UINT32_MAX, UINT32_MAX + 1, 2**63, -(2**63) - 1, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 3.4e38, 5e-324, -0.0, 0.5, 1.0]),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.none(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(numeric_keys())), value=HOSTILE)
def test_any_value_of_a_numeric_key_is_refused_in_one_line_or_fits_its_carrier(key: str, value: Any):
    section, name = key.split(".")
    try:
        cfg = C.from_dict({section: {name: value}})
    except ConfigError as e:
        assert "\n" not in str(e) and key.split(".")[0] in str(e), str(e)
        return
    got = getattr(getattr(cfg, section), name)
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return  # "auto", or a key's None (its default)
    if isinstance(got, int):
        assert -1 <= got <= (UINT32_MAX if key == "training.seed" else INT32_MAX), (key, got)
    else:
        assert math.isfinite(got) and abs(got) <= FLOAT32_MAX and np.isfinite(np.float32(got)), (key, got)


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(sorted(numeric_keys())),
    text=st.one_of(
        st.integers(min_value=-(2**80), max_value=2**80).map(str),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", "[]"]),
    ),
)
def test_set_on_the_command_line_is_refused_in_one_line_or_fits(key: str, text: str):
    try:
        C.from_dict(C.apply_overrides({}, [f"{key}={text}"]))
    except ConfigError as e:
        assert "\n" not in str(e) and key in str(e), str(e)


class Captured(Exception):
    pass


def parsers_of(module: str) -> list[cli.ArgumentParser]:
    """Every parser (subcommands' too) a command builds, caught before it parses anything."""
    made: list[cli.ArgumentParser] = []
    init = cli.ArgumentParser.__init__

    def record(self: cli.ArgumentParser, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        made.append(self)

    def stop(self: cli.ArgumentParser, *a: Any, **k: Any) -> None:
        raise Captured

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.ArgumentParser, "__init__", record)
        mp.setattr(cli.ArgumentParser, "parse_args", stop)
        if module in BENCHMARKS:
            spec = importlib.util.spec_from_file_location(f"bench_{module}", ROOT / "benchmarks" / f"{module}.py")
            mod = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(f"genesis_jax.{module}")
        mp.setattr(sys, "argv", [module])
        with pytest.raises(Captured):
            mod.main()
    return made


@functools.cache
def numeric_flags() -> list[tuple[str, cli.ArgumentParser, Any]]:
    out = []
    for module in COMMANDS + BENCHMARKS:
        for p in parsers_of(module):
            for a in p._actions:
                if a.type in (int, float):
                    pytest.fail(f"{module} {a.option_strings}: a numeric flag without a range (use ranges.flag)")
                if getattr(a.type, "__name__", "") in ("integer", "number"):
                    out.append((module, p, a))
    return out


def test_every_numeric_flag_of_every_command_has_a_range():
    flags = {(m, a.option_strings[0]) for m, _, a in numeric_flags()}
    assert {
        ("generate", "--seed"),
        ("generate", "--num-samples"),
        ("corpus.__main__", "--split-seed"),
        ("train", "--heartbeat-timeout"),
        ("train", "--join-timeout"),
        ("plan.__main__", "--devices"),
        ("torch_step", "--pause"),
        ("attention", "--sweep-limit"),
    } <= flags
    assert len(flags) >= 28


def parse(p: cli.ArgumentParser, flag: Any, text: str) -> Any:
    required = [
        x
        for a in p._actions
        if a.required and a.option_strings
        for x in (a.option_strings[0], list(a.choices)[0] if a.choices else "x")
    ]
    return p.parse_args(required + [f"{flag.option_strings[0]}={text}"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pick=st.integers(min_value=0),
    text=st.one_of(
        st.integers(min_value=-(2**80), max_value=2**80).map(str),
        st.floats().map(str),
        st.sampled_from(["nan", "inf", "-1", "2147483648", "4294967296", "18446744073709551617", "1e39", "x", ""]),
    ),
)
def test_any_text_of_a_numeric_flag_is_refused_in_one_line_or_fits(pick: int, text: str, capsys):
    flags = numeric_flags()
    module, p, action = flags[pick % len(flags)]
    capsys.readouterr()
    try:
        value = getattr(parse(p, action, text), action.dest)
    except SystemExit as e:
        assert e.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert action.option_strings[0] in line, line
        return
    assert isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX, (module, value)
    if isinstance(value, int):
        assert 0 <= value <= UINT32_MAX


def test_a_run_with_every_step_count_at_its_largest_trains(tmp_path, fixture_corpus, capsys):
    """Values at the top of their ranges reach the device without overflowing."""
    from genesis_jax import train

    top = {
        "training": {
            "seed": UINT32_MAX,
            "val_interval": INT32_MAX,
            "log_interval": INT32_MAX,
            "nonfinite_limit": INT32_MAX,
        },
        "optim": {"warmup_steps": INT32_MAX},
        "checkpoint": {"keep": INT32_MAX, "permanent_interval": INT32_MAX},
        "curriculum": {
            k: INT32_MAX
            for k in (
                "wwm_trigger_steps",
                "wwm_window",
                "wwm_ramp_steps",
                "span_trigger_steps",
                "span_window",
                "span_ramp_steps",
                "analytics_window",
                "plateau_lr_patience",
                "stun_max_count",
                "stun_cooldown_steps",
                "stun_recovery_steps",
            )
        },
        "eval": {"interval": INT32_MAX, "grokking_window": INT32_MAX, "grokking_min_step": INT32_MAX},
    }
    sets = [f"{s}.{k}={v}" for s, body in top.items() for k, v in body.items()]
    config = write_small_run_config(tmp_path / "run.toml", fixture_corpus, 3, 0)
    args = ["--config", str(config), "--run-dir", str(tmp_path / "run")] + [x for s in sets for x in ("--set", s)]
    assert train.main(args) == 0, capsys.readouterr().err
    with sqlite3.connect(tmp_path / "run" / "metrics.sqlite") as db:
        lrs = [r[0] for r in db.execute("SELECT lr FROM training_logs ORDER BY step")]
    assert lrs and all(0 < x < 1e-9 for x in lrs)  # warmup over 2**31 - 1 steps: lr / 2**31 at the start


def test_the_schedule_at_the_largest_step_count(tmp_path):
    import jax

    from genesis_jax.training.optim import lr_schedule

    o = C.from_dict({"optim": {"warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.0}}).optim
    sched = jax.jit(lr_schedule(o, INT32_MAX))
    assert float(sched(np.int32(INT32_MAX - 1))) == pytest.approx(0.0, abs=1e-6)
    assert float(sched(np.int32(9))) == pytest.approx(10 / 11)
    assert float(sched(np.int32(10))) == pytest.approx(1.0)
    assert float(sched(np.int32(10 + (INT32_MAX - 10) // 2))) == pytest.approx(0.5, abs=1e-6)  # cos(pi/2)


def test_an_argument_mistake_is_one_line_and_exit_2(capsys):
    from genesis_jax import generate

    with pytest.raises(SystemExit) as e:
        generate.main(["--run", "r", "--prompt", "p", "--seed", str(2**70)])
    assert e.value.code == 2
    assert "--seed" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "p"])
    assert e.value.code == 2 and "--run" in one_error_line(capsys.readouterr().err)


def test_config_file_numbers_are_checked_like_set(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nmax_steps = 99999999999\n")
    with pytest.raises(
        ConfigError, match=r"training.max_steps = 99999999999: expected an integer within \[1, 2\*\*31 - 1\]"
    ):
        C.load(path)
