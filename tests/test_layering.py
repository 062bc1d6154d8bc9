"""The package layers of m2mega, read from the source (every import, module-level or inside a function).

Lower layers never import higher ones, so there is no import cycle between packages, and a newcomer can
read the code bottom-up. The order (docs/architecture.md):

    runtime < ops < models < rewards < data < inference < rl < convert < train < eval < testing

``kernels`` (the top-level Triton package re-exported as ``m2mega.kernels``) sits beside ``ops``.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "m2mega"
LAYERS = ["runtime", "ops", "kernels", "models", "rewards", "data", "inference", "rl", "convert", "train", "eval",
          "testing"]


def _imports() -> list[tuple[str, str, str, int]]:
    """(importing package, imported package, file, line) for every m2mega import between packages."""
    out = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).parts
        if len(rel) < 2:
            continue
        pkg = rel[0]
        mod = ["m2mega", *f.relative_to(ROOT).with_suffix("").parts]
        if f.name == "__init__.py":
            mod = mod[:-1] + ["__init__"]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod[: -node.level]
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "m2mega" and len(parts) > 1 and parts[1] != pkg and parts[1] in LAYERS:
                    out.append((pkg, parts[1], str(f.relative_to(ROOT.parent)), node.lineno))
    return out


def test_every_package_imports_only_lower_layers():
    rank = {p: i for i, p in enumerate(LAYERS)}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), f"new package(s) {packages - set(LAYERS)}: place them in LAYERS"
    upward = [f"{f}:{line}: {a} imports {b}" for a, b, f, line in _imports() if rank[b] > rank[a]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer test can fail: a planted upward import is reported."""
    pkg = tmp_path / "m2mega"
    for name, text in {"runtime/__init__.py": "", "runtime/x.py": "def f():\n    from m2mega.train import loop\n",
                       "train/__init__.py": ""}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    assert ("runtime", "train", "m2mega/runtime/x.py", 2) in _imports()


def test_only_the_runtime_asks_whether_the_cpu_shim_is_active():
    """megatron-core workarounds live in m2mega.runtime (compat.py, cpu.py); the rest asks runtime.device()."""
    offenders = [str(f.relative_to(ROOT.parent)) for f in ROOT.rglob("*.py")
                 if f.relative_to(ROOT).parts[0] != "runtime" and "is_active()" in f.read_text(encoding="utf-8")]
    assert not offenders, offenders
