"""The import graph of the project's own modules: no cycles, and the library (``mtl``) never
imports the command-line tools (``data_prep``, ``jobs``)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mtl", "data_prep", "jobs")


def project_modules() -> dict[str, str]:
    mods = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth in the file (function-level
    imports count: they only hide a cycle). Importing ``a.b.c`` runs ``a`` and ``a.b`` too,
    unless they are the importer's own packages."""
    mods = project_modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if not name or name == m:
                    continue
                graph[m].add(name)
                parts = name.split(".")
                graph[m].update(anc for anc in (".".join(parts[:i]) for i in range(1, len(parts)))
                                if anc in mods and not (m == anc or m.startswith(anc + ".")))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the whole project was read
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_tools():
    graph = import_graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] in ("data_prep", "jobs"))
             for m, deps in graph.items() if m.split(".")[0] == "mtl"}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_the_codec_and_config_import_without_the_io_stack():
    """Package ``__init__`` files hold no logic: importing the Miniscapes codec or the config
    does not start fsspec, webdataset, Ray or DeepSpeed."""
    import subprocess
    import sys

    code = ("import sys, mtl.data.miniscapes, mtl.data.transforms, mtl.config; "
            "print(sorted(m for m in ('fsspec', 'webdataset', 'ray', 'deepspeed') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_core_runs_without_the_distributed_layer(tmp_path):
    """Every module outside ``mtl.distributed`` imports, and a local run trains and evaluates,
    with Ray, DeepSpeed, s3fs, MLflow, matplotlib and TensorBoard absent (the core install):
    an import of one of them at a module's top would fail here."""
    import subprocess
    import sys

    graph = import_graph()
    core = sorted(m for m in graph if m.split(".")[0] == "mtl" and not m.startswith("mtl.distributed"))
    code = (f"import sys, importlib\n"
            f"sys.modules.update(dict.fromkeys(('ray', 'deepspeed', 's3fs', 'mlflow', 'matplotlib', 'tensorboard')))\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            f"from jobs.train import main\n"
            f"sys.exit(main(['--local', '--quick', '--encoder', 'resnet18', '--epochs', '1', '--max-steps-per-epoch', '2',\n"
            f"               '--synthetic-counts', '8', '4', '0', '--device', 'cpu', '--workers', '0', '--name', 'core',\n"
            f"               '--out', {str(tmp_path)!r}]))\n")
    env = {**os.environ, "STREETMTL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(core) > 40 and (tmp_path / "core" / "best.pt").exists()
