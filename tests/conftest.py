"""Shared fixtures: fast CPU compilation and a small multilingual fixture corpus."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Fast compiles here and in every training process a test launches (they inherit the variable).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
from genesis_jax.core.compat import fast_cpu_compile_flags

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *fast_cpu_compile_flags()]).strip()
# One compilation cache for the session: the training processes tests launch (an uninterrupted
# run and its resumed twin, say) compile the same programs, and load them the second time.
_CACHE = tempfile.mkdtemp(prefix="genesis_jax_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The training processes tests launch start with glibc's huge-page tunable already given, so the
# train command does not exec itself again in each (tests/e2e/test_relaunch.py checks that it does).
from genesis_jax.core.host_memory import tunable_value, with_huge_pages  # noqa: E402

if tunable_value(os.environ) is None:
    os.environ["GLIBC_TUNABLES"] = with_huge_pages(os.environ, True)["GLIBC_TUNABLES"]

ROOT = Path(__file__).resolve().parent.parent


def our_modules() -> list[str]:
    """Every module name of the package, the kernels (genesis_jax.kernels) included."""
    names = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "genesis_jax").rglob("*.py")
        if "remote" not in p.parts
    ]  # hf/remote: torch code for transformers, carried by exports
    names += [f"genesis_jax.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py")]
    return [n.removesuffix(".__init__") for n in names]


# The processes tests launch turn a deprecation warning met in our code into an error too
# (PYTHONWARNINGS takes exact module names, hence the list).
os.environ["PYTHONWARNINGS"] = ",".join(
    [
        *filter(None, os.environ.get("PYTHONWARNINGS", "").split(",")),
        *(f"error::DeprecationWarning:{m}" for m in our_modules()),
    ]
)

import jax  # noqa: E402 (after the environment above, which JAX reads at import)
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

# Parallel verses: the same key in each locale is the same sentence in another language.
FIXTURE_TEXT = {
    "en": [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good.",
        "And God called the light Day, and the darkness he called Night.",
        "Don't fear; it’s the evening and the morning.",
    ],
    "fr": [
        "Au commencement, Dieu créa les cieux et la terre.",
        "La terre était informe et vide.",
        "Dieu dit: Que la lumière soit! Et la lumière fut.",
        "Dieu vit que la lumière était bonne.",
        "Dieu appela la lumière jour, et il appela les ténèbres nuit.",
        "Ainsi, il y eut un soir, et il y eut un matin.",
    ],
    "ru": [
        "В начале сотворил Бог небо и землю.",
        "Земля же была безвидна и пуста.",
        "И сказал Бог: да будет свет. И стал свет.",
        "И увидел Бог свет, что он хорош.",
        "И назвал Бог свет днем, а тьму ночью.",
        "И был вечер, и было утро: день один.",
    ],
}


def write_textdir(directory: Path, repeat: int = 40) -> Path:
    """Keyed text files; repeated chapters make enough bytes for training windows."""
    directory.mkdir(parents=True, exist_ok=True)
    for loc, verses in FIXTURE_TEXT.items():
        lines = []
        for ch in range(repeat):
            for v, text in enumerate(verses, start=1):
                lines.append(f"01.{ch + 1:03d}.{v:03d}\t{text}")
        (directory / f"{loc}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def fixture_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genesis_jax.corpus.importers import import_textdir
    from genesis_jax.corpus.store import CorpusWriter

    base = tmp_path_factory.mktemp("corpus")
    writer = CorpusWriter()
    import_textdir(writer, write_textdir(base / "src"))
    return writer.write(base / "corpus", val_fraction=0.1, split_seed=0)


@pytest.fixture
def cuda_lowering() -> Callable[[], ContextManager[object]]:
    """A context for lowering to CUDA without a GPU: JAX 0.11's Triton lowering reads the GPU
    kind from the default device, so that is a compile-only H100 (the `plan` extra) where it is
    installed; JAX 0.10 needs nothing. Nothing may execute inside it."""
    from genesis_jax.core.compat import jax_version
    from genesis_jax.plan import target as targets

    try:
        device = targets.compile_only_devices("h100")[0]
    except targets.ToolchainMissing as e:
        if jax_version() >= (0, 11):
            pytest.skip(f"lowering for CUDA on JAX {jax.__version__} without a GPU needs the plan extra: {e}")
        return contextlib.nullcontext
    return lambda: jax.default_device(device)


def toolchain_missing() -> str:
    """Why this machine cannot compile for a GPU ("" when it can)."""
    from genesis_jax.plan import target as targets

    try:
        targets.check_toolchain()
    except targets.ToolchainMissing as e:
        return str(e)
    return ""


def compiles(test: Callable[..., None]) -> Callable[..., None]:
    """A test that compiles for a GPU: marked gpu_compile, skipped without the plan extra."""
    why = toolchain_missing()
    return pytest.mark.skipif(bool(why), reason=f"plan extra not installed: {why}")(pytest.mark.gpu_compile(test))


def write_small_run_config(path: Path, corpus: Path, max_steps: int, val_interval: int, extra: str = "") -> Path:
    """A `test`-preset run on the fixture corpus, for CLI tests that need a trained run."""
    path.write_text(
        f'[model]\npreset = "test"\ncompute_dtype = "float32"\n[data]\ncorpus = "{corpus}"\nseq_len = 32\n'
        f"[training]\nmax_steps = {max_steps}\nbatch_size = 4\nlog_interval = 2\nval_interval = {val_interval}\n"
        + extra
    )
    return path


def one_error_line(err: str) -> str:
    """The one `error:` line of stderr (progress lines may come before it; no traceback may)."""
    lines = [x for x in err.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit code whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
