"""The shape of the code: the modules import each other in layers, without cycles, and the files a reader starts
with (model, data, adpo, sample, evaluate) hold none of the run machinery (fingerprints, chunks, resume, ranks).
Read from the source with ast and tokenize; nothing is imported or run."""

import ast
import os
import re
import tokenize

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# lowest first: a module may import only the modules before it; the tools (sweep, bench, check_loss) come last
LAYERS = ["codedeps", "configurator", "model", "data", "adpo", "distributed", "checks", "sample", "evaluate", "artifacts",
          "train", "sweep", "bench", "check_loss", "export"]
READING_PATH = ["model.py", "data.py", "adpo.py", "sample.py", "evaluate.py"]
MACHINERY = re.compile(r"fingerprint|chunk|resume|rank|world_size", re.IGNORECASE)
ADPO_MAX_LINES = 200
README_MAX_LINES = 250  # README LENGTH: the README.md assertion is the last one in this file


def is_test(name):
    return name.startswith("test_") or name == "conftest"


def top_level_names():
    """The names of the top-level .py files, tests included (a module importing a test is caught too)."""
    return {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}


def project_imports(module, names):
    """The project modules `module` imports, anywhere in it: at the top, inside functions, under if."""
    with open(os.path.join(HERE, f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & names - {module}


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None: a depth-first search for an edge back into its own path."""
    done, path = set(), []

    def visit(node):
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_and_each_module_imports_only_lower_layers():
    names = top_level_names()
    modules = sorted(n for n in names if not is_test(n))
    assert sorted(LAYERS) == modules, "every top-level module has a place in LAYERS, and only those"
    graph = {m: project_imports(m, names) for m in modules}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    upward = [f"{m} imports {i}" for m in LAYERS for i in sorted(graph[m])
              if i not in LAYERS or LAYERS.index(i) > LAYERS.index(m)]
    assert not upward, f"imports of a module not below in {LAYERS}: {upward}"


def line_count(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return len(f.read().splitlines())


def test_reading_path_holds_no_machinery_and_stays_short():
    found = []
    for name in READING_PATH:
        with open(os.path.join(HERE, name), "rb") as f:
            found += [f"{name}:{t.start[0]}: {t.string}" for t in tokenize.tokenize(f.readline)
                      if t.type == tokenize.NAME and MACHINERY.search(t.string)]
    assert not found, f"identifiers of the run machinery in the reading path: {found}"
    with open(os.path.join(HERE, "train.py"), encoding="utf-8") as f:
        functions = {n.name for n in ast.parse(f.read()).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert "build_triplets" in functions, "train.py defines build_triplets"
    assert line_count("adpo.py") <= ADPO_MAX_LINES, f"adpo.py has {line_count('adpo.py')} lines"
    # README LENGTH: README.md at most README_MAX_LINES lines
    assert line_count("README.md") <= README_MAX_LINES, \
        f"README LENGTH: README.md has {line_count('README.md')} lines, at most {README_MAX_LINES}"
