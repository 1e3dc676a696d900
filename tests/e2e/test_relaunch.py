"""`python -m genesis_jax.train` relaunches itself with glibc's huge-page tunable where that
changes anything (Linux, glibc >= 2.35, the kernel's huge pages on `madvise`), keeps its pid,
and says so on the run's first line; `training.host_huge_pages = false` and a launcher's own
GLIBC_TUNABLES value are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_small_run_config

from genesis_jax.core import host_memory as hm


def first_line(tmp_path: Path, corpus: Path, name: str, env: dict, *sets: str) -> str:
    cfg = write_small_run_config(tmp_path / f"{name}.toml", corpus, max_steps=1, val_interval=0)
    argv = ["--config", str(cfg), "--run-dir", str(tmp_path / name), *(a for s in sets for a in ("--set", s))]
    out = subprocess.run(
        [sys.executable, "-m", "genesis_jax.train", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return next(x for x in out.stdout.splitlines() if x.startswith("run "))


@pytest.mark.slow
def test_train_relaunches_with_huge_pages_where_they_apply(tmp_path: Path, fixture_corpus: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(ROOT)}
    applies = hm.relaunch_environment(env, hm.glibc_version(), hm.thp_mode()) is not None
    line = first_line(tmp_path, fixture_corpus, "default", env)
    assert line.endswith(f"host huge pages {'on (glibc.malloc.hugetlb=1)' if applies else hm.huge_pages_state(env)}")
    off = first_line(tmp_path, fixture_corpus, "off", env, "training.host_huge_pages=false")
    assert off.endswith(f"host huge pages {hm.huge_pages_state(env)}")
    if hm.thp_mode() != "always":
        assert "host huge pages off" in off
    said_no = first_line(tmp_path, fixture_corpus, "no", env | {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert said_no.endswith("host huge pages off (glibc.malloc.hugetlb=0)") or hm.thp_mode() == "always"
