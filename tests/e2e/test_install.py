"""The package as users get it: beside another project's `kernels` package, from a checkout with
nothing installed, and without JAX deprecation warnings in our own code."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

import genesis_jax
from genesis_jax.core.compat import module_available, version_tuple

CHECKOUT = ROOT / "kernels" / "flash_attention.py"


def python(code: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_our_kernels_never_shadow_another_kernels_package(tmp_path: Path):
    """Hugging Face's `kernels` (a dependency of transformers >= 5) is a regular top-level
    package; the checkout first on the path (as `python -m pytest` puts it) must not hide it,
    and ours must still load as genesis_jax.kernels."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'another project'\n")
    r = python(
        "import kernels, genesis_jax.kernels.flash_attention as f, genesis_jax.model.attention\n"
        "print(kernels.OWNER); print(f.__file__)",
        [ROOT, tmp_path / "site"],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    owner, kernel_file = r.stdout.splitlines()
    assert owner == "another project"
    assert Path(kernel_file).parent.name == "kernels"


def test_the_package_loads_from_a_checkout_with_nothing_installed():
    """As on a machine where nothing can be installed: PYTHONPATH=. and no install finder."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import genesis_jax, genesis_jax.kernels.flash_attention as f, genesis_jax.model.attention, genesis_jax.plan\n"
        "print(genesis_jax.__file__); print(f.__file__)"
    )
    r = python(code, [ROOT])
    assert r.returncode == 0, r.stderr[-2000:]
    package, kernel = map(Path, r.stdout.splitlines())
    assert package == ROOT / "genesis_jax" / "__init__.py" and kernel == CHECKOUT


def test_module_available_is_false_when_a_parent_package_is_missing():
    assert module_available("json") and module_available("genesis_jax.kernels.reference")
    assert not module_available("no_such_parent_package.child")  # find_spec itself raises here
    assert not module_available("genesis_jax.no_such_module")


def test_versions_are_read_from_release_and_development_strings():
    assert version_tuple("0.11.2") == (0, 11, 2) and version_tuple("0.12.0rc1") == (0, 12, 0)
    assert version_tuple("0.13.0.dev20261201+cuda") == (0, 13, 0)
    assert version_tuple("0.10.2") < (0, 11) <= version_tuple("0.11.2") < (0, 12)


def test_every_module_of_ours_imports_without_a_deprecation_warning():
    """Module-level uses of deprecated JAX names (uses inside functions are caught by the
    warning filters the suite runs under: pyproject.toml and conftest.py)."""
    code = (
        "import pkgutil, warnings, importlib, genesis_jax\n"
        "warnings.filterwarnings('error', category=DeprecationWarning, module='genesis_jax')\n"
        "for m in pkgutil.walk_packages(genesis_jax.__path__, 'genesis_jax.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "import genesis_jax.kernels as k\n"
        "for m in pkgutil.iter_modules(k.__path__, 'genesis_jax.kernels.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')"
    )
    r = python(code, [ROOT])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_the_version_is_the_installed_distributions():
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert version("genesis-jax") == genesis_jax.__version__
    except PackageNotFoundError:  # run from a checkout with nothing installed
        pass
