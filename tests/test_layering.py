"""The import graph, read from the source with ast (imports inside functions included): no cycles, the
kernels a leaf, the reference an oracle that nothing at run time imports."""
import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "molf", "molf"), (ROOT / "kernels", "molf.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "molf.kernels.routed_adamw.X" -> the module that defines X
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph():
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g[n]):
            if m == "molf":  # the package itself (`from . import x` resolves to its modules above)
                continue
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_kernels_are_a_leaf():
    for name, deps in graph().items():
        if name.startswith("molf.kernels"):
            outside = sorted(d for d in deps if d.startswith("molf") and not d.startswith("molf.kernels"))
            assert not outside, f"{name} imports {outside}: the kernels take tensors and plain tables only"


def test_nothing_at_run_time_imports_the_reference():
    users = sorted(n for n, deps in graph().items() if "molf.reference" in deps)
    assert users == [], f"{users} import molf.reference (the oracle is for tests and benchmarks only)"


def test_importing_molf_does_not_load_the_reference():
    import subprocess
    import sys
    code = "import sys, molf; m = molf.MoLFAdamW; print('molf.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_checkout_does_not_pose_as_a_top_level_kernels_package():
    """kernels/ installs as molf.kernels only; bitsandbytes and transformers import PyPI's `kernels` when it is
    there, and `python -m pytest` from the checkout would have put our folder in its place."""
    import importlib.util
    import molf.kernels
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).resolve().parent != ROOT / "kernels", spec.origin
    assert Path(molf.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_molf_runs_without_triton(tmp_path):
    """Triton is a dependency on Linux only (no wheels for macOS; Windows has its own fork): without it molf
    imports, wraps, trains and saves on its eager backend (the C loops on the CPU), and backend='triton' says
    what is missing."""
    import subprocess
    import sys
    code = f"""
import sys
sys.modules["triton"] = None  # as where it is not installed
sys.path.insert(0, {str(ROOT / "tests")!r})
import torch, molf
from helpers import tiny_qwen2
model = molf.wrap(tiny_qwen2(), ranks=(4,), alphas=(8,))
opt = molf.MoLFAdamW(model, lr=1e-2)
ids = torch.randint(0, 64, (2, 8))
before = [p.detach().clone() for p in model.parameters()]
model(ids, labels=ids).loss.backward()
opt.step()
assert opt.routing.any() and not all(map(torch.equal, before, model.parameters()))
molf.save_pretrained(model, {str(tmp_path / "saved")!r})
assert "triton" not in [k for k, v in sys.modules.items() if v is not None]
try:
    molf.MoLFLinear(torch.nn.Linear(8, 8), ranks=(2,), alphas=(4,), backend="triton")(torch.randn(2, 8))
except RuntimeError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "backend='triton' needs the triton package, which is not importable"


def test_an_interpreter_that_numpy_breaks_stops_the_suite_with_the_reason(monkeypatch):
    """Triton < 3.7's CPU interpreter with NumPy >= 2.4 fails every kernel ("only 0-dimensional arrays can be
    converted to Python scalars", seen with torch 2.11 / Triton 3.6): the suite says why and what to install."""
    import sys
    import types
    from conftest import interpreter_numpy_conflict
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, refused in (("3.6.0", "2.4.6", True), ("3.2.0", "2.5.0rc1", True),
                                                   ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
                                                   ("3.9.0+git1", "2.5.0", False)):
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=triton_version))
        monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__=numpy_version))
        reason = interpreter_numpy_conflict()
        assert (reason is not None) == refused, (triton_version, numpy_version, reason)
        if refused:
            assert f"Triton {triton_version}" in reason and f"NumPy {numpy_version}" in reason
            assert "numpy<2.4" in reason
    monkeypatch.delenv("TRITON_INTERPRET")  # compiled kernels (a GPU) never meet the interpreter's conversion
    assert interpreter_numpy_conflict() is None
