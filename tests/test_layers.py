"""The shape of the code, read from the source with ast (nothing is imported or run): imports only go down and
never in a circle; the reading path (model, data, adpo, sample, evaluate, train) stands without the machinery
package (harness/) and the tools (tools/); in train.py only main() touches the machinery, and the method
functions take plain arguments; and the sizes the project promises."""

import ast
import glob
import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

READING_PATH = ["model", "data", "adpo", "sample", "evaluate", "train"]  # the paper's files, in layer order
MACHINERY, TOOLS = "harness", "tools"
# the method's functions: models, tensors, settings and at most one callback; never a Run, a path, a
# checkpoint name or a fingerprint
METHOD_FUNCTIONS = {"train": ["make_tokenizer", "train_sft", "build_triplets", "reference_logps",
                              "policy_logps", "train_preference", "final_pass", "evaluate_policy"],
                    "evaluate": ["eval_sets", "evaluate", "evaluate_sft_control", "token_logratios",
                                 "stability", "gradient_by_reply"]}
NOT_PLAIN = ("run", "path", "dir", "file", "ckpt", "checkpoint", "fingerprint")  # in a parameter's name
CALLBACKS = {"hooks", "sample_replies", "sample", "loss_of"}
# the scripts whose `python NAME.py` runs a tool: only in their __main__ block, and only by runpy
COMMAND_LINES = {"sample": "tools.chat", "adpo": "tools.check_loss"}
LIMITS = {"top-level entries": 16, "top-level .py files": 8, "reading path lines": 1800, "adpo.py lines": 200,
          "README.md lines": 250, "columns": 110}


def modules():
    """{module name: path} of every project module: the top-level scripts and the packages' files."""
    found = {}
    for path in glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "*", "*.py")):
        relative = os.path.relpath(path, HERE)[:-3].split(os.sep)
        if relative[0] in ("tests", "out") or relative[-1] == "conftest" or relative[-1].startswith("test_"):
            continue
        found[".".join(relative[:-1] if relative[-1] == "__init__" else relative)] = path
    return found


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read())


def imports(tree, names):
    """The project modules a tree imports, anywhere (top, functions, try), with the line of each: for
    `from package import module`, the module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                       for a in node.names]
        else:
            continue
        found |= {(t, node.lineno) for t in targets if t in names}
    return found


def layer(module):
    """Lower first: the reading path in its order, then the machinery, then train.py, then the tools."""
    if module.startswith(TOOLS):
        return len(READING_PATH) + 2
    if module == "train":
        return len(READING_PATH) + 1
    if module.split(".")[0] == MACHINERY:
        return len(READING_PATH)
    return READING_PATH.index(module)


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None: a depth-first search for an edge back into its path."""
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


def layer_violations(found=None):
    """Every import that goes up a layer, and one import cycle if there is one."""
    found = found or modules()
    graph = {m: {t for t, _ in imports(parse(p), found) if t != m} for m, p in found.items()}
    problems = [f"{m} imports {t}" for m, targets in graph.items() for t in sorted(targets)
                if layer(t) > layer(m)]
    cycle = find_cycle(graph)
    return problems + (["import cycle: " + " -> ".join(cycle)] if cycle else [])


def test_imports_go_down_without_cycles():
    found = modules()
    assert set(READING_PATH) <= set(found) and any(m.startswith(MACHINERY + ".") for m in found)
    assert not layer_violations(found)


def machinery_touches(tree, found):
    """(statement, line) of train.py's top-level code that names or imports the machinery or the tools: a
    function or class by its name."""
    touched = []
    for node in tree.body:
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {t.split(".")[0] for t, _ in imports(node, found)}
        names |= {n.value.split(".")[0] for n in ast.walk(node)  # by name: sys.modules["harness..."]
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if {MACHINERY, TOOLS} & names:
            touched.append((getattr(node, "name", type(node).__name__), node.lineno))
    return touched


def is_main_block(node):
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def test_only_train_main_touches_the_machinery_and_the_reading_path_imports_none_of_it():
    found = modules()
    for module in READING_PATH[:-1]:
        tree = parse(found[module])
        outside = {t for t, _ in imports(tree, found) if t.split(".")[0] in (MACHINERY, TOOLS)}
        assert not outside, f"{module}.py imports {outside}"
        # by name too (importlib, __import__, sys.modules, runpy): only a __main__ block's command line
        runs = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and n.value.split(".")[0] in (MACHINERY, TOOLS)]
        in_main = [n for stmt in tree.body if is_main_block(stmt) for n in ast.walk(stmt)]
        assert all(n in in_main for n in runs), f"{module}.py names the machinery or a tool outside __main__"
        assert [n.value for n in runs] == ([COMMAND_LINES[module]] if module in COMMAND_LINES else [])
    tree = parse(found["train"])
    touches = [where for where, _ in machinery_touches(tree, found)]
    assert touches == ["Import", "main", "If"], touches  # `import harness`, main(), `if __name__ == ...`


def test_method_functions_take_plain_arguments():
    found = modules()
    for module, names in METHOD_FUNCTIONS.items():
        functions = {n.name: n for n in parse(found[module]).body if isinstance(n, ast.FunctionDef)}
        for name in names:
            bad = machinery_arguments(functions[name])
            assert not bad, f"{module}.{name} takes {bad}"
            assert not file_access(functions[name]), f"{module}.{name} reads or writes files"


def machinery_arguments(function):
    """What a method function must not take: a parameter named for a run, a path or a checkpoint (any kind of
    parameter), or more than one callback."""
    a = function.args
    args = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [v for v in (a.vararg, a.kwarg) if v]]
    bad = [x for x in args if any(part in x.lower() for part in NOT_PLAIN)]
    callbacks = CALLBACKS & set(args)
    return bad + (sorted(callbacks) if len(callbacks) > 1 else [])


def file_access(function):
    """The calls in a function's body that read or write files: open, os.*, pathlib, any save/load/dump."""
    calls = [ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)]
    io = ("open", "save", "load", "dump", "savez", "loadtxt", "savetxt", "write_text", "read_text",
          "write_bytes", "read_bytes")
    return [c for c in calls
            if c.split(".")[-1] in io or c.startswith(("os.", "shutil.", "pathlib.", "Path"))]


def test_nothing_imports_the_tools():
    found = modules()
    for module, path in found.items():
        if not module.startswith(TOOLS):
            assert not {t for t, _ in imports(parse(path), found) if t.startswith(TOOLS)}, module


def test_a_planted_violation_fails(tmp_path):
    """The rules above catch what they name: an upward import, a cycle, train.py helpers touching harness."""
    found = modules()
    planted = tmp_path / "data.py"
    planted.write_text(open(found["data"]).read() + "\nfrom harness import checks\n")
    assert "data imports harness.checks" in layer_violations({**found, "data": str(planted)})
    planted.write_text(open(found["model"]).read() + "\nimport adpo\n")
    problems = layer_violations({**found, "model": str(planted)})
    assert any("cycle" in p or "model imports adpo" in p for p in problems)
    tree = parse(found["train"])
    tree.body.append(ast.parse("def helper(s):\n    return harness.start(s)\n").body[0])
    assert "helper" in [w for w, _ in machinery_touches(tree, found)]


def sizes():
    top = [e for e in os.listdir(HERE) if not e.startswith(".") and e not in ("out", "__pycache__")
           and not e.endswith((".egg-info",))]
    git_top = os.popen(f"git -C {HERE} ls-files").read().split()
    tracked = {p.split("/")[0] for p in git_top} or set(top)
    widest = max((len(line.rstrip("\n")), p) for p in modules().values()
                 for line in open(p, encoding="utf-8"))
    return {"top-level entries": len([e for e in tracked if not e.startswith(".")]),
            "top-level .py files": len([e for e in tracked if e.endswith(".py")]),
            "reading path lines": sum(len(open(os.path.join(HERE, f"{m}.py")).read().splitlines())
                                      for m in READING_PATH),
            "adpo.py lines": len(open(os.path.join(HERE, "adpo.py")).read().splitlines()),
            "README.md lines": len(open(os.path.join(HERE, "README.md")).read().splitlines()),
            "columns": widest[0]}, widest[1]


def test_the_sizes_the_project_promises():
    measured, widest_file = sizes()
    over = {k: f"{v} > {LIMITS[k]}" for k, v in measured.items() if v > LIMITS[k]}
    assert not over, f"{over} (widest line in {widest_file})"
