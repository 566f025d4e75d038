"""The structure of docs/architecture.md, checked on the source (AST; nothing is imported but the package's own
tables): no import cycle, no import from a lower floor to a higher one, imports at the top except the optional
packages' adapters, no collective and no process-wide setting under layers/, one start-up (every entry point
through init_runtime, and nothing else creating a process group, setting the device or switching TF32), a trainer
that only trains (its class under 250 lines, no task names), one home for each choice list, and the kernels' folder
importable only as usp_scale.kernels."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "usp_scale")
KERNELS = os.path.join(ROOT, "kernels")

# docs/architecture.md, "Floors"
FLOORS = {"fileio": 0, "cluster": 0, "runtime": 0, "kernels": 0, "assets": 0,
          "layers": 1, "checkpoint": 1,
          "models": 2, "diffusion": 2, "transport": 2, "vae": 2,
          "config": 3, "data": 3, "sample": 3, "transfer": 3,
          "engine": 4, "eval": 5, "training": 6}
# Optional third-party packages -> their adapters (module-name prefixes), the only modules that import them
OPTIONAL = {"deepspeed": ("usp_scale.engine.deepspeed",),
            "torch_fidelity": ("usp_scale.eval.features", "usp_scale.eval.metrics"),
            "triton": ("usp_scale.kernels",), "nvidia": ("usp_scale.data.dali",), "torchao": ("usp_scale.engine.fp8",),
            "flash_attn": ("usp_scale.layers.attention",), "flash_attn_interface": ("usp_scale.layers.attention",),
            "torch.utils.tensorboard": ("usp_scale.training.metrics",), "matplotlib": ("usp_scale.training.metrics",),
            "apex": ("usp_scale.training.optim",)}
TASK_NAMES = ("pretrain", "dit", "sit", "cls", "linprobe")


def _files():
    """(module name, path) of every module of the package, the kernels' folder as usp_scale.kernels."""
    out = []
    for base, prefix in ((PKG, "usp_scale"), (KERNELS, "usp_scale.kernels")):
        for dp, dirs, fs in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in sorted(fs):
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dp, f), base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out.append((".".join([prefix] + parts), os.path.join(dp, f)))
    return out


FILES = _files()
MODULES = {name for name, _ in FILES}


def _is_package(path):
    return os.path.basename(path) == "__init__.py"


def _imports(name, path):
    """[(imported module, lineno, at module level?)] of one module: usp_scale modules resolved, others as written."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    pkg = name if _is_package(path) else name.rsplit(".", 1)[0]
    top = set(map(id, tree.body))
    out = []

    def visit(node, level_ok):
        for child in ast.iter_child_nodes(node):
            at_top = level_ok and (id(child) in top or isinstance(node, (ast.If, ast.Try, ast.With)))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, at_top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module
                names = [f"{mod}.{a.name}" for a in child.names]
                subs = [n for n in names if n in MODULES]
                out.extend((m, child.lineno, at_top) for m in (subs or [mod]))
            visit(child, at_top if isinstance(child, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) else False)

    visit(tree, True)
    return out


IMPORTS = {name: _imports(name, path) for name, path in FILES}


def _package(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def _internal(mod):
    return mod == "usp_scale" or mod.startswith("usp_scale.")


def test_every_package_has_a_floor():
    assert {_package(m) for m in MODULES if _package(m)} == set(FLOORS), "add the package to FLOORS and " \
        "docs/architecture.md"


def test_no_import_from_a_lower_floor_to_a_higher_one():
    bad = []
    for name, edges in IMPORTS.items():
        src = _package(name)
        for mod, line, _ in edges:
            dst = _package(mod) if _internal(mod) else None
            if src and dst and FLOORS[dst] > FLOORS[src]:
                bad.append(f"{name}:{line} imports {mod} ({dst}, floor {FLOORS[dst]} > {src}'s {FLOORS[src]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {name: {m for m, _, _ in edges if m in MODULES and m != name} for name, edges in IMPORTS.items()}
    # a package's __init__ importing its own submodules is the package's entry, not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state, stack, cycles = {}, [], []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _optional(mod):
    return next((o for o in OPTIONAL if mod == o or mod.startswith(o + ".")), None)


ADAPTERS = {name for name, edges in IMPORTS.items() if any(_optional(m) for m, _, _ in edges)}


def test_optional_packages_only_in_their_adapters():
    bad = [f"{name}:{line} imports {mod} (its adapters: {', '.join(OPTIONAL[_optional(mod)])})"
           for name, edges in IMPORTS.items() for mod, line, _ in edges
           if _optional(mod) and not name.startswith(OPTIONAL[_optional(mod)])]
    assert not bad, "\n".join(bad)


def test_imports_of_the_package_sit_at_the_top():
    """Every import of a usp_scale module sits at the top of its module (no hidden arrows), except in an optional
    package's adapter and of an adapter (which must not load before it is needed: its package is optional)."""
    bad = [f"{name}:{line} imports {mod} inside a function" for name, edges in IMPORTS.items()
           if name not in ADAPTERS for mod, line, top in edges
           if _internal(mod) and not top and mod not in ADAPTERS]
    assert not bad, "\n".join(bad)


def test_no_hand_written_lazy_import_tables():
    """Module-level __getattr__ only where a package's names come from an optional package's adapters (the
    kernels: triton; eval: torch-fidelity), so importing the package does not import that package."""
    lazy = sorted(name for name, path in FILES
                  if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                         for n in ast.parse(open(path).read()).body))
    assert lazy == ["usp_scale.eval", "usp_scale.kernels"], lazy


def test_no_collective_and_no_process_wide_setting_under_layers():
    bad = []
    for name, path in FILES:
        if not name.startswith("usp_scale.layers"):
            continue
        tree = ast.parse(open(path).read())
        for mod, line, _ in IMPORTS[name]:
            if mod.startswith("torch.distributed") or (_internal(mod) and _package(mod) == "runtime"):
                bad.append(f"{name}:{line} imports {mod}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                bad.append(f"{name}:{node.lineno} writes a module global ({', '.join(node.names)})")
    assert not bad, "\n".join(bad)


def _calls(path):
    """Dotted names of every call in a file (``dist.init_process_group``, ``init_runtime``, ...)."""
    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call):
            f, parts = node.func, []
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            out.append((".".join(reversed(parts)), node.lineno))
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "allow_tf32":
                    out.append(("=allow_tf32", node.lineno))
    return out


ENTRY_POINTS = ["launchers/sample.py", "launchers/cache_latents.py", "launchers/transfer.py",
                "benchmarks/train/bench_step.py", "benchmarks/train/profile_step.py", "benchmarks/sample/bench_sampling.py",
                "benchmarks/scaling/measure_comm.py"]
# the scripts this project owns (launchers/evaluate.py, train_vae.py, train_extractor.py and benchmarks/convergence/
# are outside issue 19: the evaluation and the main job's tools adopt the start-up in their own issues)
SCRIPTS = ENTRY_POINTS + ["launchers/pretrain.py", "launchers/finetune.py", "launchers/make_synthetic.py",
                          "launchers/tiny_report.py", "benchmarks/train/build_memory.py"]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_points_start_through_init_runtime(script):
    assert any(c.endswith("init_runtime") for c, _ in _calls(os.path.join(ROOT, script))), script


def test_the_trainer_starts_through_init_runtime():
    calls = [c for c, _ in _calls(os.path.join(PKG, "training", "trainer.py"))]
    assert "init_runtime" in calls and "resolve_job" in calls
    cli = [c for c, _ in _calls(os.path.join(PKG, "training", "cli.py"))]
    assert "Trainer" in cli   # launchers/pretrain.py and finetune.py run training.cli


def test_start_up_has_one_home():
    """Only usp_scale/runtime creates a process group, sets the CUDA device, switches TF32 or chooses the attention
    kernel."""
    forbidden = ("init_process_group", "cuda.set_device", "set_float32_matmul_precision", "=allow_tf32",
                 "resolve_attention")
    paths = [p for n, p in FILES if not n.startswith("usp_scale.runtime")] + [os.path.join(ROOT, s) for s in SCRIPTS]
    bad = []
    for path in paths:
        for call, line in _calls(path):
            if any(call == f or call.endswith("." + f) or (f.startswith("=") and call == f) for f in forbidden):
                if call == "init_process_group" and path.endswith("build_memory.py"):  # the runtime's own, imported
                    continue
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} {call}")
    assert not bad, "\n".join(bad)


def test_trainer_only_trains():
    tree = ast.parse(open(os.path.join(PKG, "training", "trainer.py")).read())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    size = cls.end_lineno - cls.lineno + 1
    assert size <= 250, f"the Trainer class has {size} lines: move a policy into its own module"
    names = [n.value for n in ast.walk(cls) if isinstance(n, ast.Constant) and n.value in TASK_NAMES]
    assert not names, f"the trainer names tasks {names}: declare it on the task (training/tasks.py)"
    families = [n.value for n in ast.walk(cls) if isinstance(n, ast.Constant) and n.value in ("mae", "vit")]
    assert not families, families


def test_one_home_for_each_choice_list():
    """A choice list of three or more values appears as a literal once in the package (the module that implements
    the choice owns it; config/schema.py refers to it)."""
    sys.path.insert(0, ROOT)
    from usp_scale.config.validate import schema_choices

    lists = {k: set(v) for k, v in schema_choices().items() if len(v) >= 3}
    seen = {}
    for name, path in FILES:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 3 and \
                    all(isinstance(e, ast.Constant) for e in node.elts):
                vals = {e.value for e in node.elts}
                for key, want in lists.items():
                    if vals == want:
                        seen.setdefault(key, []).append(f"{name}:{node.lineno}")
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    assert not twice, twice


def test_kernels_folder_is_not_a_bare_module():
    """The kernels' folder refuses to be imported as a top-level `kernels` (the PyPI package and diffusers' probe
    own that name): importing it from the repository root fails with a message naming usp_scale.kernels."""
    init = open(os.path.join(KERNELS, "__init__.py")).read()
    assert "usp_scale.kernels" in init and "__name__" in init
