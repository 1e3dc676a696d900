"""The huge-page relaunch decides from the C library, the kernel's mode and the launcher's own
GLIBC_TUNABLES: each case by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genesis_jax.core import host_memory as hm


@pytest.mark.parametrize(
    ("text", "expected"),
    [("glibc 2.36", (2, 36)), ("glibc 2.41", (2, 41)), ("glibc 2.35.1", (2, 35)), ("", None), ("musl 1.2", None)],
)
def test_glibc_version_reads_confstr(monkeypatch: pytest.MonkeyPatch, text: str, expected: tuple | None) -> None:
    monkeypatch.setattr(os, "confstr", lambda name: text)
    assert hm.glibc_version() == expected


def test_glibc_version_is_none_where_confstr_does_not_know_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(name: str) -> str:
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", unknown)
    assert hm.glibc_version() is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]", "never"),
        ("garbage", None),
    ],
)
def test_thp_mode_is_the_bracketed_word(tmp_path: Path, text: str, expected: str | None) -> None:
    f = tmp_path / "enabled"
    f.write_text(text)
    assert hm.thp_mode(f) == expected
    assert hm.thp_mode(tmp_path / "missing") is None


def test_relaunch_adds_the_tunable_beside_the_launchers_own() -> None:
    env = {"PATH": "/bin"}
    assert hm.relaunch_environment(env, (2, 36), "madvise") == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hm.relaunch_environment(other, (2, 41), "madvise")["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )


@pytest.mark.parametrize(
    ("env", "glibc", "mode"),
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),  # the launcher said no
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise"),  # already relaunched: no loop
        ({}, (2, 34), "madvise"),  # glibc without the tunable
        ({}, None, "madvise"),  # not glibc
        ({}, (2, 36), "always"),  # every large mapping has huge pages already
        ({}, (2, 36), "never"),
        ({}, (2, 36), None),  # no /sys
    ],
)
def test_no_relaunch_where_it_would_change_nothing(env: dict, glibc: tuple | None, mode: str | None) -> None:
    assert hm.relaunch_environment(env, glibc, mode) is None


def test_state_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hm, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hm, "thp_mode", lambda: "madvise")
    assert hm.huge_pages_state({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "on (glibc.malloc.hugetlb=1)"
    assert hm.huge_pages_state({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "off (glibc.malloc.hugetlb=0)"
    assert hm.huge_pages_state({}) == "off (kernel: madvise)"
    monkeypatch.setattr(hm, "thp_mode", lambda: "always")
    assert hm.huge_pages_state({}) == "on (kernel: always)"


def test_with_huge_pages_sets_or_removes_only_its_tunable() -> None:
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "X": "1"}
    assert hm.with_huge_pages(env, True)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hm.with_huge_pages(env, False) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    assert hm.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False) == {}
