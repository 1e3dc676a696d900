"""The import graph keeps its layers: nouns below, commands on top, no circles (docs/design.md,
"The tree"). Read from the code's own imports, lazy and type-only ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = "genesis_jax"

# Bottom to top: a module may import its own layer and the layers below it, nothing above.
LAYERS = (
    "core",  # errors, the byte vocabulary, file writing, version bridges, platforms, how commands end
    "kernels",  # Pallas kernels and their references (top-level kernels/, imported as genesis_jax.kernels)
    "config",  # the schema, ranges, loading: no JAX
    "parallel",  # the mesh, sharding rules, processes
    "corpus",  # the on-disk corpus and its importers
    "data",  # host arrays, the device corpus, masks, samplers, verse examples
    "model",  # the Llama, attention backends, heads, losses, decoding, FLOP and memory counts
    "research",  # curriculum, analytics, the research state
    "evaluation",  # the suite and its metrics
    "telemetry",  # sinks: SQLite, TensorBoard, console, report plots
    "hf",  # Hugging Face's layout, files, export, reading an export back
    "training",  # state, step, objectives, optimizer, build, loop and hooks, checkpoints, run directories, a run
    "plan",  # compiling for an absent GPU
    "commands",  # python -m genesis_jax.<verb>: argparse and one library call
)
COMMANDS = ("train", "generate", "eval", "report", "verify", "export", "corpus.__main__", "plan.__main__")
NO_JAX = ("config",)  # loading a config starts no accelerator runtime and no kernel


def modules() -> dict[str, Path]:
    """Dotted name under genesis_jax (kernels included) -> file."""
    out = {}
    for base, prefix in ((ROOT / PACKAGE, ""), (ROOT / "kernels", "kernels.")):
        for p in base.rglob("*.py"):
            if "remote" in p.parts:  # torch code an export carries; never imported by us
                continue
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[(prefix + ".".join(parts)).rstrip(".")] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports, anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module[len(PACKAGE) + 1 :]
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1 :])
    return {m for m in found if m != name}


def layer(name: str) -> str:
    if name in COMMANDS:
        return "commands"
    return name.split(".")[0] if name else "core"  # the package's __init__ stands on the ground floor


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in graph():
        assert layer(name) in LAYERS, f"genesis_jax.{name}: in no layer (add its subpackage to LAYERS)"


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({layer(a)}) -> {b} ({layer(b)})"
        for a, deps in g.items()
        for b in deps
        if LAYERS.index(layer(b)) > LAYERS.index(layer(a))
    )


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan: every strongly connected component of more than one module
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_up_a_layer():
    up = upward(graph())
    assert not up, "imports that run up a layer:\n" + "\n".join(up)


def test_no_circles():
    found = circles(graph())
    assert not found, f"modules that import each other: {found}"


def test_config_imports_no_jax():
    for name, path in modules().items():
        if layer(name) not in NO_JAX:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax", "optax")], (name, names)
    # and at run time: loading a TOML starts neither JAX nor a kernel
    probe = (
        "import sys, genesis_jax.config as c\n"
        f"c.load({str(ROOT / 'configs' / 'tiny.toml')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax') or 'kernels' in m))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_the_checks_catch_what_they_guard():
    """A config module importing the model, and two data modules importing each other, are caught."""
    g = {"config.checks": {"model.attention"}, "model.attention": set(), "data.a": {"data.b"}, "data.b": {"data.a"}}
    assert upward(g) == ["config.checks (config) -> model.attention (model)"]
    assert circles(g) == [["data.a", "data.b"]]
    assert layer("train") == "commands" and layer("plan.__main__") == "commands" and layer("plan.jobs") == "plan"
