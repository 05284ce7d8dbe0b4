"""The package layering: fedhq_kernels is an op library that needs nothing of fedhq; the
import graph reads fedhq_kernels <- fedhq (fl, analysis, ...) <- fedhq.flower, with
bench/ on top and no arrow back. Checked statically over every import statement (those
inside functions too), and by running the library where fedhq cannot be imported."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = {"bench", *(p.stem for p in (ROOT / "bench").glob("*.py"))}  # bench scripts import each other by stem


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``: ``import a.b``, ``from a
    import b`` (as ``a`` and ``a.b``), relative imports resolved against the file's
    package, and ``importlib.import_module`` / ``__import__`` of a constant string."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _is(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def violations(root: Path = ROOT) -> list[str]:
    """Every import that crosses a layer the wrong way, as 'path:line imports module (rule)'."""
    out = []
    for path in sorted([*(root / "fedhq_kernels").rglob("*.py"), *(root / "fedhq").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        in_kernels = rel.startswith("fedhq_kernels/")
        in_flower = rel.startswith("fedhq/flower/")
        for line, module in imports(path, root):
            if in_kernels and _is(module, "fedhq"):
                out.append(f"{rel}:{line} imports {module} (fedhq_kernels must not import fedhq)")
            if not in_kernels and not in_flower and _is(module, "flwr"):
                out.append(f"{rel}:{line} imports {module} (only fedhq/flower/ imports Flower)")
            if not in_kernels and not in_flower and rel != "fedhq/cli.py" and _is(module, "fedhq.flower"):
                out.append(f"{rel}:{line} imports {module} (only the command line sits above fedhq.flower)")
            if any(_is(module, top) for top in BENCH_MODULES):
                out.append(f"{rel}:{line} imports {module} (nothing in the packages imports bench/)")
    return out


def test_the_import_graph_has_no_arrow_back():
    assert violations() == []


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "fedhq_kernels" / "sub").mkdir(parents=True)
    (tmp_path / "fedhq" / "fl").mkdir(parents=True)
    (tmp_path / "fedhq" / "flower").mkdir()
    (tmp_path / "fedhq_kernels" / "__init__.py").write_text("")
    (tmp_path / "fedhq_kernels" / "sub" / "__init__.py").write_text("")
    (tmp_path / "fedhq_kernels" / "sub" / "m.py").write_text(
        textwrap.dedent("""
        import torch
        def f():
            from fedhq.profile import timing
        def g():
            import importlib
            importlib.import_module("fedhq.models")
        from ..functional import fake_quant
    """)
    )
    (tmp_path / "fedhq" / "__init__.py").write_text("")
    (tmp_path / "fedhq" / "fl" / "engine.py").write_text(
        textwrap.dedent("""
        from fedhq_kernels import quantize
        class C:
            def m(self):
                import flwr.common
                from ..flower import strategy
                import bench_kernels
    """)
    )
    (tmp_path / "fedhq" / "flower" / "app.py").write_text("import flwr\nfrom fedhq.fl import engine\n")
    found = violations(tmp_path)
    assert [v.split(" (")[0] for v in found] == [
        "fedhq/fl/engine.py:5 imports flwr.common",
        "fedhq/fl/engine.py:6 imports fedhq.flower",
        "fedhq/fl/engine.py:6 imports fedhq.flower.strategy",
        "fedhq/fl/engine.py:7 imports bench_kernels",
        "fedhq_kernels/sub/m.py:4 imports fedhq.profile",
        "fedhq_kernels/sub/m.py:4 imports fedhq.profile.timing",
        "fedhq_kernels/sub/m.py:7 imports fedhq.models",
    ]
    assert (8, "fedhq_kernels.functional") in imports(tmp_path / "fedhq_kernels" / "sub" / "m.py", tmp_path)


# Run in a fresh interpreter from the checkout's root, with a finder first on
# sys.meta_path that refuses fedhq and every fedhq.* module.
WITHOUT_FEDHQ = """
import importlib, pkgutil, sys

class NoFedhq:
    def find_spec(self, name, path=None, target=None):
        if name == "fedhq" or name.startswith("fedhq."):
            raise ImportError(f"{name} is blocked: fedhq_kernels must not need it")
        return None

sys.meta_path.insert(0, NoFedhq())
try:
    import fedhq
except ImportError:
    pass
else:
    raise SystemExit("the blocker let fedhq through")

import torch
import fedhq_kernels as fk

for info in pkgutil.walk_packages(fk.__path__, "fedhq_kernels."):
    importlib.import_module(info.name)  # every module of the library imports

gen = torch.Generator().manual_seed(0)
x = torch.randn(64, 32, generator=gen)
y = fk.fake_quant(x)
assert torch.equal(y, fk.dequantize(fk.quantize(x)))  # observed per-tensor 8-bit, both ways
q = fk.quantize(x, bits=4, axis=0)
d = fk.dequantize(q)
assert d.shape == x.shape and (d - x).abs().max() <= q.scale.max()
updates = [fk.quantize(torch.randn(64, 32, generator=gen)) for _ in range(3)]
mean = fk.aggregate(updates, [1.0, 2.0, 3.0])
assert mean.data.shape == (64, 32) and mean.data.dtype == torch.int8
sd = fk.aggregate_state_dicts([{"w": u} for u in updates], [1, 1, 1])
assert torch.equal(fk.dequantize_state_dict(sd)["w"], fk.dequantize(sd["w"]))
packed = fk.pack_codes(q.data, 4)
assert packed.numel() == q.data.numel() // 2
assert torch.equal(fk.unpack_codes(packed, 4, q.data.shape), q.data)
loaded = sorted(m for m in sys.modules if m == "fedhq" or m.startswith("fedhq."))
assert not loaded, loaded
print("ok", ",".join(fk.backends()))
"""


def test_the_library_imports_and_runs_without_fedhq():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_FEDHQ], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok ")


def test_what_moved_out_of_the_library_is_gone():
    # the profile is fedhq.profile, the GPU self test bench/gpu_selftest.py
    names = {info.name for info in pkgutil.iter_modules([str(ROOT / "fedhq_kernels")])}
    assert not names & {"profile", "selftest"}, names
    assert (ROOT / "fedhq" / "profile" / "__main__.py").is_file() and (ROOT / "bench" / "gpu_selftest.py").is_file()
