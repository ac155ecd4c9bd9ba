"""The project's layout: imports go one way (scripts -> gpt2lib), with no cycle, and importing any
script or module does no heavy work."""

import ast
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_gpt2", "hellaswag", "fineweb")
PACKAGE = "gpt2lib"


def project_modules(root=REPO):
    """{module name: file path} of the scripts and the package's modules."""
    modules = {name: os.path.join(root, name + ".py") for name in SCRIPTS}
    for name in sorted(os.listdir(os.path.join(root, PACKAGE))):
        if name.endswith(".py"):
            module = PACKAGE if name == "__init__.py" else f"{PACKAGE}.{name[:-3]}"
            modules[module] = os.path.join(root, PACKAGE, name)
    return modules


def imported_names(path):
    """Every module name an import statement in the file mentions, at top level or inside functions;
    `from gpt2lib import hf` counts as gpt2lib.hf."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(root=REPO):
    """{module: set of project modules it imports}."""
    modules = project_modules(root)
    return {
        module: {name for name in imported_names(path) if name in modules and name != module}
        for module, path in modules.items()
    }


def find_cycle(graph):
    """A list of modules forming a cycle, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def package_imports_of_scripts(graph):
    return sorted(
        (module, target)
        for module, targets in graph.items()
        if module.startswith(PACKAGE)
        for target in targets
        if target in SCRIPTS
    )


def test_the_import_graph_has_no_cycle_and_the_package_imports_no_script():
    graph = import_graph()
    assert graph["train_gpt2"] >= {
        "gpt2lib.common",
        "gpt2lib.checkpoints",
        "gpt2lib.distributed",
    }  # it sees them
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert package_imports_of_scripts(graph) == []
    assert "hellaswag" not in graph["train_gpt2"], "training must not pull in hellaswag.py's command line"


def test_the_checks_see_a_cycle_a_lazy_import_and_a_package_import_of_a_script(tmp_path):
    """The same checks on a copy with one bad import each: they must fail."""
    (tmp_path / PACKAGE).mkdir()
    for name in SCRIPTS:
        (tmp_path / f"{name}.py").write_text("import gpt2lib.common\n")
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "common.py").write_text("import os\n")
    (tmp_path / PACKAGE / "hf.py").write_text("def f():\n    from gpt2lib import checkpoints\n")  # lazy
    (tmp_path / PACKAGE / "checkpoints.py").write_text("from gpt2lib.hf import f\n")
    graph = import_graph(str(tmp_path))
    assert find_cycle(graph) in (
        ["gpt2lib.checkpoints", "gpt2lib.hf", "gpt2lib.checkpoints"],
        ["gpt2lib.hf", "gpt2lib.checkpoints", "gpt2lib.hf"],
    )
    (tmp_path / PACKAGE / "checkpoints.py").write_text("def g():\n    import train_gpt2\n")
    graph = import_graph(str(tmp_path))
    assert find_cycle(graph) is None
    assert package_imports_of_scripts(graph) == [("gpt2lib.checkpoints", "train_gpt2")]


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_importing_does_no_heavy_work(module):
    """transformers, tiktoken, datasets, wandb and tensorboard load on first use, never at import."""
    code = (
        f"import sys; import {module}; "
        "print(sorted(m for m in ('transformers', 'tiktoken', 'datasets', 'safetensors', 'wandb', "
        "'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_checkpoint_config_keys_are_the_model_configs_fields():
    from dataclasses import fields

    from gpt2lib.checkpoints import MODEL_CONFIG_KEYS
    from train_gpt2 import GPTConfig

    assert MODEL_CONFIG_KEYS == tuple(f.name for f in fields(GPTConfig))


def test_names_users_import_from_train_gpt2_stay():
    import train_gpt2

    for name in ("GPT", "GPTConfig", "DataLoaderLite", "generate", "get_encoding"):
        assert hasattr(train_gpt2, name), name
    for method in ("from_pretrained", "from_checkpoint", "save_pretrained"):
        assert callable(getattr(train_gpt2.GPT, method)), method


def test_one_set_of_dtype_names_with_torchs_spelling_as_aliases(capsys):
    import hellaswag
    import train_gpt2

    for given, canonical in (
        ("bfloat16", "bf16"),
        ("float16", "fp16"),
        ("float32", "fp32"),
        ("bf16", "bf16"),
    ):
        assert train_gpt2.parse_config(["--dtype", given]).dtype == canonical
        assert hellaswag.parse_args(["-m", "gpt2", "--dtype", given]).dtype == canonical
    assert hellaswag.autocast_dtype("fp32") == torch.float32 and hellaswag.autocast_dtype("auto") is None
    assert train_gpt2.validate(train_gpt2.parse_config(["--dtype", "float64"]), 1) == [
        "--dtype must be one of auto, bf16, fp16, fp32, got float64"
    ]
    with pytest.raises(SystemExit):
        hellaswag.parse_args(["-m", "gpt2", "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


GENERIC_RUNNERS = ("decide", "on_every_rank")  # DistContext's: they run the caller's function on ranks


def script_callbacks_into_package(path):
    """(line, call) of every call in a script that hands the package one of the script's own functions
    or classes, or a lambda around one: the package takes instances and values. DistContext.decide and
    on_every_rank are exempt: running a caller's function on the chosen ranks is what they are for."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    own = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    package_names = set()  # modules and names the script imports from the package
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            package_names.update(alias.asname or alias.name for alias in node.names)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        root = func
        while isinstance(root, ast.Attribute):
            root = root.value
        if not (isinstance(root, ast.Name) and root.id in package_names):
            continue
        if isinstance(func, ast.Attribute) and func.attr in GENERIC_RUNNERS:
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            names = (
                [n.id for n in ast.walk(arg) if isinstance(n, ast.Name)]
                if isinstance(arg, ast.Lambda)
                else [arg.id]
                if isinstance(arg, ast.Name)
                else []
            )
            if any(name in own for name in names):
                found.append((node.lineno, ast.unparse(node)[:80]))
    return found


def test_the_script_hands_the_package_no_function_or_class_of_its_own(tmp_path):
    for script in SCRIPTS:
        assert script_callbacks_into_package(os.path.join(REPO, script + ".py")) == [], script
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from gpt2lib import resume\nclass Loader: pass\ndef f(): pass\n"
        "resume.find_holder(Loader, 1)\nresume.x(key=lambda: f())\nresume.ok(Loader(), lambda x: x + 1)\n"
    )
    assert [line for line, _ in script_callbacks_into_package(str(bad))] == [4, 5]
