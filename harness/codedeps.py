"""
What code an artifact is computed from: every piece of the project's code that its stage can reach, found by
reading the source (nothing is run, so the answer is known before anything is computed, and is the same under
--compile, under torchrun and in a resumed run).

From a root (a function, a class, a module, a data file) the walk follows every name the code uses:
- a name of its module, or of the module it was imported from: the statement that defines it (a function,
  a class, a constant, a table of functions), decorators and default arguments included (they are in the
  definition's source);
- `module.name` and `Class.name` chains, to that definition;
- where the object is not known from the source (`run.sample`, `self.cache`, `model.generate`): every member
  of that name in every class of the modules the roots import (methods, class attributes and
  `self.name = ...` assignments), and for a call of an unknown object, every `forward` and `__call__`: the
  conservative side;
- a string literal that names a data file of the repository (provoked.txt): the file's content, not its path.
A runtime root is unwrapped first (decorators' __wrapped__, functools.partial's function and arguments, a
bound method's function, a closure's cells). Each piece counts as its syntax tree without docstrings, so a
reworded comment or docstring changes nothing. exclude names tables the walk does not enter: train.py's
fingerprints exclude adpo.LOSSES, so that each loss counts only in its own checkpoints.
"""

import ast
import copy
import functools
import hashlib
import inspect
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DATA_SUFFIXES = (".txt", ".csv", ".tsv")  # data files the code may read; artifacts (out_dir) are never these
NOT_PROJECT_DIRS = {"out", "docs", "__pycache__", "site-packages", "venv", ".venv", "env"}
CALLED_BY_PYTHON = ("forward", "__call__")  # what calling an unknown object may run
MUTATORS = ("append", "extend", "insert", "update", "setdefault", "add", "register", "pop", "remove", "clear")
IMPLICIT = ("forward", "backward", "setup_context")  # what torch calls itself (nn.Module, autograd.Function)


def read_source(path):
    """The text of a project file (tests plant edits here)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def module_file(name):
    """The project file of module `name` (ROOT/a/b.py or ROOT/a/b/__init__.py for a.b), or None for a module
    outside the project (torch, numpy, ...). Found from the name alone: nothing is imported."""
    if not name or name.startswith("."):
        return None
    parts = name.split(".")
    if set(parts[:-1]) & NOT_PROJECT_DIRS or parts[0] in NOT_PROJECT_DIRS:
        return None
    for path in (os.path.join(ROOT, *parts) + ".py", os.path.join(ROOT, *parts, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def data_files(name):
    """The files a string literal may name: ROOT/name, and files of its base name in the project's folders."""
    found = [os.path.join(ROOT, name)] if os.path.isfile(os.path.join(ROOT, name)) else []
    base = os.path.basename(name)
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in NOT_PROJECT_DIRS and not d.startswith("."))
        found += [os.path.join(folder, base)] if base in files and folder != ROOT else []
    return sorted(set(found))


def real_name(name):
    """A module's importable name; for the script that was run (__main__: python train.py, python -m
    tools.sweep), the name of its file."""
    module = sys.modules.get(name)
    if name == "__main__":
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
    elif module_file(name) is not None:
        return name
    # a script, or a module imported under another name (pytest's tests/test_x.py as test_x): by its file
    path = getattr(module, "__file__", None)
    inside = path and not os.path.relpath(os.path.realpath(path), ROOT).startswith("..")
    return module_name(os.path.realpath(path)) if inside else name


def module_name(path):
    relative = os.path.splitext(os.path.relpath(path, ROOT))[0].split(os.sep)
    return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def strip_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


class Module:
    """One project file, parsed: its top-level statements by the names they define."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.tree = strip_docstrings(ast.parse(read_source(path)))
        self.package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        self.top = {}  # name -> the top-level statements that bind or change it
        for stmt in self.tree.body:
            for bound in bound_names(stmt):
                self.top.setdefault(bound, []).append(stmt)

    def imported(self, stmt, name):
        """Where `name`, bound by an import statement, comes from: ("module", m) or ("name", m, attr)."""
        for alias in stmt.names:
            if (alias.asname or alias.name.split(".")[0]) != name:
                continue
            if isinstance(stmt, ast.Import):
                return ("module", alias.name if alias.asname else alias.name.split(".")[0])
            return ("name", self.source_module(stmt), alias.name)
        return None

    def source_module(self, stmt):
        """The module a `from m import ...` statement reads, relative imports (from . import x) resolved."""
        if not stmt.level:
            return stmt.module or ""
        package = self.package.split(".") if self.package else []
        package = package[:len(package) - stmt.level + 1]
        return ".".join(package + ([stmt.module] if stmt.module else []))


def bound_names(stmt):
    """The names a statement binds or changes in its scope (LOSSES["x"] = f and LOSSES.update(...) change
    LOSSES), looking into if, for, while, with and try blocks but not into functions, classes or lambdas."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return [a.asname or a.name.split(".")[0] for a in stmt.names if a.name != "*"]
    targets = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor)):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        targets = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    names = []
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.append(node.id)
            elif isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
                names.append(chain_base(node))
    call = stmt.value if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) else None
    if call is not None and isinstance(call.func, ast.Attribute) and call.func.attr in MUTATORS:
        names.append(chain_base(call.func))  # TABLE.update(...), TABLE.append(...)
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(stmt, field, None) or []:
            names += bound_names(child) if isinstance(child, ast.stmt) else \
                [n for s in child.body for n in bound_names(s)]  # an except handler
    return [n for n in dict.fromkeys(names) if n]


def chain_base(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


_PARSED = {}


def parsed(name, path):
    """The Module of a file, parsed again only when its text changed."""
    text = read_source(path)
    key = (name, path, hashlib.sha256(text.encode("utf-8")).hexdigest())
    if key not in _PARSED:
        _PARSED[key] = Module(name, path)
    return _PARSED[key]


# ----------------------------------------------------------------------------------------------------------
# the walk


class Walk:
    def __init__(self, exclude=()):
        """exclude: "module.NAME" for a module-level name (adpo.LOSSES), a data file ("provoked.txt"), or a
        function, class or method (their definitions are not entered: another artifact's code)."""
        self.exclude = {tuple(x.rsplit(".", 1)) for x in exclude  # {("adpo", "LOSSES")}
                        if isinstance(x, str) and not x.endswith(DATA_SUFFIXES)}
        self.excluded_files = {x for x in exclude if isinstance(x, str) and x.endswith(DATA_SUFFIXES)}
        self.pieces = {}  # label -> the text that counts
        self.todo = []
        self.seen = set()
        self.modules = {}
        self.excluded = set()
        self.members_asked = set()
        for obj in (x for x in exclude if not isinstance(x, str)):
            target = inspect.unwrap(obj.__func__ if inspect.ismethod(obj) else obj)
            module = self.module(real_name(target.__module__))
            if module is not None:
                self.excluded |= {(module.name, id(node)) for node, _ in locate(module, target)}
        self.seen |= self.excluded
        self.index = None
        self._universe = None
        self._parents = None
        self.reached_from = {}  # piece -> the piece whose code named it (None: a root)
        self.current = None

    def module(self, name):
        """The parsed project module `name` (read once per walk), or None."""
        if name not in self.modules:
            path = module_file(name)
            self.modules[name] = parsed(name, path) if path else None
        return self.modules[name]

    def add(self, module, node, label):
        key = (module.name, id(node))
        if key in self.seen:
            return
        self.seen.add(key)
        name = f"{module.name}:{label}:{getattr(node, 'lineno', 0)}"
        if name in self.pieces:  # another statement or lambda on the same line
            name += f":{getattr(node, 'col_offset', 0)}"
        shown = class_header(node) if isinstance(node, ast.ClassDef) else node
        self.pieces[name] = f"{module.name}:{dump(shown)}"
        self.reached_from[name] = self.current
        self.todo.append((module, node, name))

    def run(self, roots):
        for root in roots:
            self.follow_root(root)
        answered = None
        while self.todo or answered != self.universe():
            if not self.todo:  # modules met late may hold members asked for early
                answered = self.universe()
                for name, classes in list(self.members_asked):
                    self.member(name, classes)
                continue
            module, node, self.current = self.todo.pop()
            if node is module.tree:  # a whole module: each of its statements
                for stmt in module.tree.body:
                    if not any((module.name, n) in self.exclude for n in bound_names(stmt)):
                        self.add(module, stmt, label_of(stmt))
            elif isinstance(node, ast.ClassDef):  # a class: its bases, decorators and class attributes, the
                header = class_header(node)  # methods they name (property(_get), a table of methods), and
                self.scan(module, header)  # those Python or torch call by themselves (__init__, __call__,
                named = {n.id for n in ast.walk(header) if isinstance(n, ast.Name)}  # forward, ...); the
                for stmt in node.body:  # others by their names
                    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                            stmt.name in named or stmt.name in IMPLICIT
                            or stmt.name.startswith("__") and stmt.name.endswith("__")):
                        self.add(module, stmt, stmt.name)
            else:
                self.scan(module, node)
        return self.pieces

    def follow_root(self, root):
        if isinstance(root, str) and root.endswith(DATA_SUFFIXES):
            if not os.path.isfile(os.path.join(ROOT, root)):
                raise ValueError(f"no data file {root!r} in {ROOT}")
            return self.add_file(root)
        if isinstance(root, str):
            module = self.module(root)
            if module is None:
                raise ValueError(f"{root!r} is not a module of the project")
            return self.add(module, module.tree, "<module>")
        before = len(self.pieces)
        self.follow_object(root)
        if len(self.pieces) == before and not self.seen_root(root):
            raise ValueError(f"{root!r} is not the project's code: an artifact computed from it would never "
                             "go stale")

    def seen_root(self, root):
        target = inspect.unwrap(getattr(root, "func", root))
        module = getattr(target, "__module__", None)
        return module is not None and self.module(real_name(module)) is not None

    # runtime objects: the roots, and values the source does not show

    def follow_object(self, obj, depth=0):
        if depth > 20:
            return
        if isinstance(obj, functools.partial):
            self.value(("partial", obj.args, obj.keywords))
            for x in (obj.func, *obj.args, *obj.keywords.values()):
                self.follow_object(x, depth + 1)
        elif isinstance(obj, (dict, list, tuple, set, frozenset)):
            for x in (obj.values() if isinstance(obj, dict) else obj):
                self.follow_object(x, depth + 1)
        elif isinstance(obj, (staticmethod, classmethod)) or inspect.ismethod(obj):
            self.follow_object(obj.__func__, depth + 1)
        elif inspect.ismodule(obj):
            module = self.module(obj.__name__)
            if module is not None:
                self.add(module, module.tree, "<module>")
        elif callable(obj):
            while True:  # a decorated function: the decorator's wrapper (if the project's) and each layer
                self.follow_definition(obj, depth)
                if not hasattr(obj, "__wrapped__") or depth > 20:
                    break
                obj, depth = obj.__wrapped__, depth + 1

    def follow_definition(self, obj, depth):
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            if type(obj).__module__ and self.module(real_name(type(obj).__module__)):
                self.follow_definition(type(obj), depth)  # an instance of a project class, called
                attributes = getattr(obj, "__dict__", {})  # and what it was made with: Scaled(2.0)
                self.value(("instance", type(obj).__qualname__, attributes))
                self.follow_object(dict(attributes), depth + 1)
            return
        module = self.module(real_name(obj.__module__))
        if module is None:
            return
        located = locate(module, obj)
        if any((module.name, id(node)) in self.excluded for node, _ in located):
            return  # another artifact's code, with what it was made with
        for node, label in located:
            self.add(module, node, label)
        for cell in getattr(obj, "__closure__", None) or ():  # what a closure was made with: make_loss(2.0)
            try:
                self.value(("closure", obj.__qualname__, cell.cell_contents))
                self.follow_object(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
        for value in (getattr(obj, "__defaults__", None) or ()) + \
                tuple((getattr(obj, "__kwdefaults__", None) or {}).values()):
            self.follow_object(value, depth + 1)

    def value(self, value):
        """A plain value the code was given at run time (a partial's arguments, a closure's cell)."""
        text = plain(value)
        self.pieces[f"value:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"] = text

    def add_file(self, name):
        """A data file the code names: ROOT/name, or any file of that name in the project's folders."""
        if name in self.excluded_files:
            return
        for path in data_files(name):
            with open(path, "rb") as f:
                relative = os.path.relpath(path, ROOT)
                self.pieces[f"file:{relative}"] = f"file:{relative}:{hashlib.sha256(f.read()).hexdigest()}"

    # the source

    def scan(self, module, node):
        local, events = references(node)
        for kind, n in events:
            if kind == "file":
                self.add_file(n)
            elif kind == "name":
                self.global_name(module, n.id)  # a local too: it may shadow a module-level name
            elif kind == "chain":
                self.chain(module, n, local)
            elif kind == "unknown call":
                self.unknown_call()  # layers[i](x), make()(x), compute() of a parameter
            elif kind == "getattr":
                self.dynamic_attribute(module, n.args[0], n.args[1], local)
            elif kind == "runtime names":
                self.add(module, module.tree, "<module>")  # names looked up at run time: the whole module
            elif kind == "import" and node is not module.tree:
                self.local_import(module, n)

    def local_import(self, module, stmt):
        """An import inside a function or under try: what it binds, as if at the top."""
        for alias in stmt.names:
            if alias.name == "*":
                target = self.module(module.source_module(stmt))
                if target is not None:
                    self.add(target, target.tree, "<module>")
                continue
            found = self.imported_name(module, stmt, alias.asname or alias.name.split(".")[0])
            if found is not None and found[0] == "module":  # a local name: its uses are not resolved
                self.add(found[1], found[1].tree, "<module>")

    def dynamic_attribute(self, module, base, name, local):
        """getattr(x, "name") as x.name; getattr(module, computed) as the whole module; getattr(self or cls,
        computed) as every class of this module. Not followed: getattr(other, computed), such as
        getattr(settings, key), which reads a setting (held by value in the fingerprints)."""
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            return self.chain(module, ast.Attribute(value=base, attr=name.value, ctx=ast.Load()), local)
        where = self.global_name(module, base.id) if isinstance(base, ast.Name) else None
        if where is not None and where[0] == "module":
            self.add(where[1], where[1].tree, "<module>")
        elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
            for cls in module.tree.body:  # every class of the module, every method
                if isinstance(cls, ast.ClassDef):
                    self.add(module, cls, cls.name)
                    for stmt in cls.body:
                        self.add(module, stmt, label_of(stmt))

    def unknown_call(self):
        for name in CALLED_BY_PYTHON:
            self.member(name)

    def member(self, name, classes=None):
        """Every definition of member `name` in the classes of the modules the walk can reach (classes: only
        those, by name). Asked again when the walk has met more modules (Walk.run)."""
        self.members_asked.add((name, classes))
        universe = self.universe()
        if self.index is None or self.index[0] != universe:
            self.index = (universe, member_index(tuple(self.module(m) for m in sorted(universe))))
        for module, cls, stmt in self.index[1].get(name, []):
            if (classes is None or cls.name in classes) and (module.name, cls.name) not in self.exclude:
                self.add(module, stmt, label_of(stmt))

    def parents(self):
        """The names of the classes that some project class derives from."""
        universe = self.universe()
        if self._parents is None or self._parents[0] != universe:
            self._parents = (universe, base_classes(tuple(self.module(m) for m in sorted(universe))))
        return self._parents[1]

    def universe(self):
        """The project modules that the modules met so far import, directly or not (never the tools that
        import train.py: nothing of theirs can reach its code), this file aside (it computes fingerprints,
        not artifacts)."""
        if self._universe and len(self.modules) == self._universe[2]:
            return self._universe[0]
        names = {m for m, module in self.modules.items() if module is not None}
        if self._universe and names <= self._universe[1]:
            self._universe = (*self._universe[:2], len(self.modules))
            return self._universe[0]
        todo = list(names)
        while todo:
            for name in imported_modules(self.module(todo.pop())):
                if name not in names and self.module(name) is not None:
                    names.add(name)
                    todo.append(name)
        self._universe = (frozenset(names - {__name__}), names, len(self.modules))
        return self._universe[0]

    def global_name(self, module, name, depth=0):
        """Adds the definition of module-level `name` of `module`; returns what it is: ("module", Module),
        ("class", Module, node), ("value",) or None (not the project's, a builtin, or excluded)."""
        if depth > 20 or (module.name, name) in self.exclude:
            return None
        stmts = module.top.get(name)
        starred = None
        for stmt in module.tree.body:  # from x import *: x's name, if x is the project's (all of them: which
            if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):  # one binds last
                target = self.module(module.source_module(stmt))  # depends on the order)
                if target is not None and name in target.top:
                    starred = self.global_name(target, name, depth + 1) or starred
        if not stmts and starred is not None:
            return starred
        if not stmts:
            runtime = sys.modules.get(module.name)
            value = vars(runtime).get(name) if runtime is not None else None
            if value is not None and not isinstance(value, (str, bytes, int, float, bool)):
                self.follow_object(value)  # bound where the source does not show (import *, setattr)
                return ("value",)
            submodule = self.module(f"{module.name}.{name}") if module.path.endswith("__init__.py") else None
            if submodule is not None:  # package.module, as `import package.module` reads it
                return ("module", submodule)
            return None
        found = None
        for stmt in stmts:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found = self.imported_name(module, stmt, name, depth) or found
            else:
                self.add(module, stmt, label_of(stmt))
                found = ("class", module, stmt) if isinstance(stmt, ast.ClassDef) else ("value",)
        runtime = vars(sys.modules[module.name]).get(name) if module.name in sys.modules else None
        if isinstance(runtime, (dict, list, tuple, set, frozenset)):
            self.follow_object(runtime)  # a table filled at run time: a decorator's registry
        return found

    def imported_name(self, module, stmt, name, depth=0):
        """What `name`, bound by an import statement of `module`, is: as global_name says; ("outside",) for
        another project's module."""
        source = module.imported(stmt, name)
        target = self.module(source[1]) if source else None
        if source is None:
            return None
        if target is None:
            return ("outside",)
        if source[0] == "module":
            return ("module", target)
        submodule = self.module(f"{source[1]}.{source[2]}")
        if source[2] not in target.top and submodule is not None:  # from package import module: as import
            return ("module", submodule)
        return self.global_name(target, source[2], depth + 1)

    def chain(self, module, node, local):
        """a.b.c: the definition each step names where the source tells; else every member of that name."""
        attrs, base = [], node
        while isinstance(base, ast.Attribute):
            attrs.append(base.attr)
            base = base.value
        attrs.reverse()
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            # super().x: x of a project class that some project class derives from
            return self.member(attrs[0], classes=frozenset(self.parents()))
        if not isinstance(base, ast.Name):
            return self.unknown_chain(attrs)  # f().x, table[k].x: the base itself is scanned on its own
        if base.id in local:
            self.unknown_chain(attrs)  # a local that may shadow a module-level name: both
        where = self.global_name(module, base.id)
        for i, attr in enumerate(attrs):
            if where is None or where[0] == "outside":
                return  # a builtin's, an excluded table's, or outside the project
            if where[0] == "module":
                where = self.global_name(where[1], attr)
            elif where[0] == "class":
                found = [s for s in where[2].body if attr in bound_names(s)]
                for stmt in found:
                    self.add(where[1], stmt, label_of(stmt))
                if not found:
                    return self.unknown_chain(attrs[i:])  # inherited or set on instances
                where = ("value",)
            else:
                return self.unknown_chain(attrs[i:])  # a method of a value (a dict's, a project instance's)

    def unknown_chain(self, attrs):
        for attr in attrs:
            self.member(attr)


@functools.lru_cache(maxsize=None)
def imported_modules(module):
    """The modules a module imports anywhere in it, and for `from m import x` also m.x (a submodule)."""
    names = []
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                source = module.imported(node, alias.asname or alias.name.split(".")[0])
                if source is not None:
                    names += [source[1]] if source[0] == "module" else [source[1], f"{source[1]}.{source[2]}"]
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=64)
def member_index(modules):
    """{name: [(module, class, statement)]}: every statement of a class that defines member `name` (methods,
    class attributes, and the methods that assign self.name)."""
    index = {}
    for module in modules:
        for cls in ast.walk(module.tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            for stmt in cls.body:
                names = bound_names(stmt)
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names += [n.attr for n in ast.walk(stmt) if isinstance(n, ast.Attribute)
                              and isinstance(n.ctx, ast.Store)]
                for name in dict.fromkeys(names):
                    index.setdefault(name, []).append((module, cls, stmt))
    return index


@functools.lru_cache(maxsize=64)
def base_classes(modules):
    return {b.id if isinstance(b, ast.Name) else b.attr for m in modules for c in ast.walk(m.tree)
            if isinstance(c, ast.ClassDef) for b in c.bases if isinstance(b, (ast.Name, ast.Attribute))}


@functools.lru_cache(maxsize=None)
def references(node):
    """What a piece of code refers to, read once: (its local names, [(kind, syntax node)])."""
    local = local_names(node)
    inner = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    called = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    events = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith(DATA_SUFFIXES) \
                and "\n" not in n.value and len(n.value) < 256:
            events.append(("file", n.value))
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in inner:
            events.append(("name", n))
            if n.id in local and id(n) in called:
                events.append(("unknown call", n))
        elif isinstance(n, ast.Attribute) and id(n) not in inner:
            events.append(("chain", n))
        elif isinstance(n, ast.Call) and not isinstance(n.func, (ast.Name, ast.Attribute)):
            events.append(("unknown call", n))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr" \
                and len(n.args) >= 2:
            events.append(("getattr", n))
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("globals", "vars")
              and not n.args) or (isinstance(n, ast.Attribute) and n.attr == "modules"
                                  and isinstance(n.value, ast.Name) and n.value.id == "sys"):
            events.append(("runtime names", n))
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            events.append(("import", n))
    return local, events


def local_names(node):
    """Names bound inside a function, lambda or class (arguments and assignments); empty for a module-level
    statement, whose names are the module's."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.comprehension)
        scopes = [n for n in ast.walk(node) if isinstance(n, kinds)]
        names = set()
        for scope in scopes:
            names |= local_names(scope) if not isinstance(scope, ast.comprehension) else \
                {n.id for n in ast.walk(scope.target) if isinstance(n, ast.Name)}
        return names
    declared_global = {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}
    names = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
    names |= {n.id for n in ast.walk(node)
              if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    names |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                             ast.ClassDef)) and n is not node}
    return names - declared_global


def locate(module, obj):
    """The syntax tree of a function or class: by its qualified name; a nested function as the whole
    top-level definition around it; a lambda as the lambdas on its line; unknown: the whole module."""
    parts = obj.__qualname__.split(".")
    scope = module.tree
    for i, part in enumerate(parts):
        if part == "<lambda>" or part == "<locals>":
            if scope is not module.tree:
                return [(scope, label_of(scope))]  # the enclosing definition holds it
            line = obj.__code__.co_firstlineno
            found = [n for n in ast.walk(scope) if isinstance(n, ast.Lambda) and n.lineno == line]
            spans = [(c, e) for l0, l1, c, e in getattr(obj.__code__, "co_positions", lambda: [])()
                     if l0 == line == l1 and c is not None and e and (c, e) != (0, 0)]
            if spans and len(found) > 1:  # several lambdas on the line: the one around this code's columns
                inside = [n for n in found if n.col_offset <= min(c for c, _ in spans)
                          and max(e for _, e in spans) <= n.end_col_offset]
                found = [min(inside, key=lambda n: n.end_col_offset - n.col_offset)] if inside else found
            return [(n, "<lambda>") for n in found] or [(module.tree, "<module>")]
        definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        found = [n for n in getattr(scope, "body", []) if isinstance(n, definitions) and n.name == part]
        if not found:
            break
        scope = found[-1]
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and i + 1 < len(parts):
            return [(scope, label_of(scope))]  # something defined inside a function: the whole function
    else:
        return [(scope, label_of(scope))]
    return [(module.tree, "<module>")] if scope is module.tree else [(scope, label_of(scope))]


def label_of(stmt):
    names = bound_names(stmt) if not isinstance(stmt, ast.Module) else ["<module>"]
    return ",".join(names) if names else type(stmt).__name__


@functools.lru_cache(maxsize=None)
def class_header(node):
    """A class without its methods (each counts on its own, when reached)."""
    header = copy.copy(node)
    header.body = [s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))] \
        or [ast.Pass()]
    return header


@functools.lru_cache(maxsize=None)
def dump(node):
    return ast.dump(node)


def plain(value):
    """value as stable text: what it holds, never a memory address, a path or a hash order."""
    return json.dumps(normalized(value), sort_keys=True)


def normalized(x, depth=0):
    """x as JSON values: arrays and tensors by their bytes' hash, sets sorted, dicts as sorted pairs,
    functions and classes by name, modules by name, other objects by type and attributes."""
    if depth > 8:
        return type(x).__qualname__
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [normalized(v, depth + 1) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((normalized(v, depth + 1) for v in x), key=json.dumps)
    if isinstance(x, dict):
        pairs = ([normalized(k, depth + 1), normalized(v, depth + 1)] for k, v in x.items())
        return sorted(pairs, key=json.dumps)
    if inspect.ismodule(x):
        return {"module": real_name(x.__name__)}
    if isinstance(x, functools.partial):
        return {"partial": normalized(x.func, depth + 1), "args": normalized(x.args, depth + 1),
                "keywords": normalized(x.keywords, depth + 1)}
    if inspect.ismethod(x):
        return {"method": normalized(x.__func__, depth + 1), "of": normalized(x.__self__, depth + 1)}
    if inspect.isfunction(x) or inspect.isclass(x) or inspect.isbuiltin(x):
        # by the module's importable name: the same when train.py runs as a script (__main__) or is imported
        return f"{real_name(getattr(x, '__module__', None) or '')}.{getattr(x, '__qualname__', repr(x))}"
    if hasattr(x, "state_dict") and callable(x.state_dict):  # an nn.Module: its weights
        return {"module": type(x).__qualname__, "state": normalized(dict(x.state_dict()), depth + 1)}
    if hasattr(x, "detach") and hasattr(x, "dtype"):  # a tensor
        x = x.detach().cpu().contiguous()
        raw = x.reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
        return {"tensor": str(x.dtype), "shape": list(x.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    if hasattr(x, "tobytes") and hasattr(x, "dtype"):  # a numpy array or scalar
        return {"array": str(x.dtype), "shape": list(getattr(x, "shape", ())),
                "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    if hasattr(x, "__dict__"):
        return {"object": type(x).__qualname__, "attributes": normalized(vars(x), depth + 1)}
    text = repr(x)
    return type(x).__qualname__ if " at 0x" in text else text


def reached(*roots, exclude=()):
    """{label: text} of every piece of code and data the roots reach. Walked anew each call: runtime values
    (a registry, a callable's attributes) can change between calls; the reading of the source is cached."""
    return Walk(exclude).run(roots)


def definitions(*objects):
    """The source of each function or class itself, without what it reaches (train.main: the glue)."""
    walk = Walk()
    for obj in objects:
        module = walk.module(real_name(obj.__module__))
        if module is None:
            raise ValueError(f"{obj!r} is not the project's code")
        walk.add(module, *locate(module, obj)[0])
    return sorted(walk.pieces.values())


def path_to(piece, *roots, exclude=()):
    """How the roots reach a piece (a label of reached()): the chain of pieces, root first (why stale?)."""
    walk = Walk(exclude)
    walk.run(roots)
    chain = [piece]
    while walk.reached_from.get(chain[-1]):
        chain.append(walk.reached_from[chain[-1]])
    return chain[::-1]


def code_of(*roots, exclude=()):
    """What an edit of the roots or of anything they reach can change, as sorted texts (no labels: moving a
    function within its file changes nothing)."""
    return sorted(reached(*roots, exclude=exclude).values())
