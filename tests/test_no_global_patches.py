"""Nothing in `offseg_hf` patches `torch` or `transformers`: no assignment (or deletion, or `setattr`) on the
`torch` / `transformers` modules, their submodules, or a class or function imported from them, and no
`unittest.mock`. Such a patch changes every model in the process, including one that another thread is running;
the export forms are subclasses given to the instances of the model being exported (`offseg_hf.export.swin.
swapped_classes`), and assigning an instance's `__class__` is allowed: it changes one object.

The check is static (`ast`), on every `.py` file of the package, and is itself tested on snippets that do and do
not patch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "offseg_hf"
PATCHED_LIBRARIES = ("torch", "transformers")
MOCK_MODULES = ("mock", "unittest.mock")
# `type(x)` and `x.__class__` are classes of unknown origin (possibly a transformers class): assigning their
# attributes is refused too.
UNKNOWN_CLASS = "<class of an object>"


def _is_patched_library(module: str) -> bool:
    return module.split(".")[0] in PATCHED_LIBRARIES


def _is_mock(module: str) -> bool:
    return module in MOCK_MODULES or module.startswith(tuple(f"{name}." for name in MOCK_MODULES))


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _own_nodes(scope: ast.AST) -> tuple[list[ast.AST], list[ast.AST]]:
    """The nodes of `scope` outside its nested functions and classes, and those nested scopes."""
    own, nested = [], []
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, SCOPES):
            nested.append(node)
        else:
            own.append(node)
            stack.extend(ast.iter_child_nodes(node))
    return own, nested


def _bound_names(target: ast.AST) -> list[str]:
    """The names an assignment target binds (`a, b` binds both; `torch.x` and `a[i]` bind none)."""
    return [node.id for node in ast.walk(target) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)]


def _bindings(scope: ast.AST, own: list[ast.AST]) -> list[tuple[str, bool | ast.AST]]:
    """(name, how) for every name `scope` binds: `how` is True for an import of a torch / transformers object, the
    assigned expression for a plain `name = value` (a library object if `value` is one), False otherwise."""
    found: list[tuple[str, bool | ast.AST]] = []
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = scope.args
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
        found += [(argument.arg, False) for argument in every if argument is not None]
    for node in own:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.asname or alias.name.split(".")[0], _is_patched_library(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            library = node.level == 0 and bool(node.module) and _is_patched_library(node.module)
            found += [(alias.asname or alias.name, library) for alias in node.names]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                value = node.value if isinstance(target, ast.Name) else False
                found += [(name, value) for name in _bound_names(target)]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.AsyncFor, ast.comprehension)):
            found += [(name, False) for name in _bound_names(node.target)]
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            found += [(name, False) for name in _bound_names(node.optional_vars)]
        elif isinstance(node, ast.NamedExpr):
            found.append((node.target.id, False))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found.append((node.name, False))
    return found


def _library_names(scope: ast.AST, own: list[ast.AST], enclosing: set[str]) -> set[str]:
    """The names that refer to torch / transformers objects in `scope`: those of the enclosing scope it does not
    rebind, and those it binds only by importing them from the libraries or by aliasing a library object
    (`Layer = swin.SwinLayer`)."""
    bindings: dict[str, list[bool | ast.AST]] = {}
    for name, how in _bindings(scope, own):
        bindings.setdefault(name, []).append(how)
    names = enclosing - set(bindings)
    changed = True
    while changed:  # aliases of aliases
        changed = False
        for name, hows in bindings.items():
            if name not in names and all(how is True or (how is not False and _root(how) in names) for how in hows):
                names.add(name)
                changed = True
    return names


def _root(node: ast.AST) -> str | None:
    """The name an attribute / subscript chain starts at (`torch` for `torch.nn.functional.pad`); `vars(x)` and
    `getattr(x, ...)` lead to `x`; `type(x)` and any `.__class__` on the way are a class of unknown origin; a
    chain that starts at any other call's result (a new object) has no root."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            if node.attr == "__class__":
                return UNKNOWN_CLASS
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            if node.func.id == "type":
                return UNKNOWN_CLASS
            if node.func.id not in ("vars", "getattr"):
                return None
            node = node.args[0]
        else:
            return None


def _targets(node: ast.AST) -> list[ast.AST]:
    """The assigned (or deleted) expressions of a statement, tuples and lists unpacked."""
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    elif isinstance(node, ast.Delete):
        found = list(node.targets)
    else:
        return []
    flat = []
    while found:
        target = found.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            found.extend(target.elts)
        elif isinstance(target, ast.Starred):
            found.append(target.value)
        else:
            flat.append(target)
    return flat


def _patched(target: ast.AST, library: set[str]) -> bool:
    """Whether assigning `target` changes a library object: an attribute or item of something rooted in a library
    name or of a class of unknown origin. `obj.__class__ = C` itself changes the object `obj` only."""
    if isinstance(target, ast.Attribute) and target.attr == "__class__":
        root = _root(target.value)
        return root == UNKNOWN_CLASS or root in library
    if not isinstance(target, (ast.Attribute, ast.Subscript)):
        return False
    root = _root(target)
    return root == UNKNOWN_CLASS or root in library


def _setattr_object(call: ast.Call) -> ast.AST | None:
    """The object whose attribute `setattr(obj, ...)`, `delattr(obj, ...)` or `<any>.__setattr__(obj, ...)` sets."""
    func = call.func
    if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and call.args:
        return call.args[0]
    if isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__delattr__"):
        return call.args[0] if call.args else func.value
    return None


def global_patches(source: str, filename: str = "<snippet>") -> list[str]:
    """`file:line: what` for every patch of `torch` / `transformers` and every use of `unittest.mock` in `source`."""
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}: {ast.unparse(node).splitlines()[0]}")

    scopes = [(ast.parse(source, filename), set())]
    while scopes:
        scope, enclosing = scopes.pop()
        own, nested = _own_nodes(scope)
        library = _library_names(scope, own, enclosing)
        scopes += [(inner, library) for inner in nested]
        for node in own:
            if any(_patched(target, library) for target in _targets(node)):
                report(node, "assigns an attribute of torch / transformers or of a class")
            elif isinstance(node, ast.Call) and (obj := _setattr_object(node)) is not None:
                if _root(obj) == UNKNOWN_CLASS or _root(obj) in library:
                    report(node, "sets an attribute of torch / transformers or of a class")
            elif isinstance(node, ast.Import) and any(_is_mock(alias.name) for alias in node.names):
                report(node, "imports unittest.mock")
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and (_is_mock(node.module) or (node.module == "unittest" and any(a.name == "mock" for a in node.names)))
            ):
                report(node, "imports unittest.mock")
            elif isinstance(node, ast.Attribute) and (
                (node.attr == "mock" and _root(node.value) == "unittest")
                or (node.attr == "patch" and isinstance(node.value, ast.Name) and node.value.id == "mock")
            ):
                report(node, "uses unittest.mock")
    return sorted(found)


def test_the_package_patches_neither_torch_nor_transformers():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the package, not an empty folder
    found = [patch for path in files for patch in global_patches(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert found == []


SWIN = "from transformers.models.swin.modeling_swin import SwinLayer\n"

PATCHES = {
    "torch function": "import torch\ntorch.linspace = f\n",
    "two at once": "import torch\ntorch.linspace, torch.as_tensor = f, g\n",
    "imported class": SWIN + "SwinLayer.forward = g\n",
    "aliased module": "from transformers.models.swin import modeling_swin as swin\nswin.SwinLayer.forward = g\n",
    "alias of a class": SWIN + "Layer = SwinLayer\nLayer.maybe_pad = g\n",
    "augmented": "import torch.nn as nn\nnn.Module.dump_patches += 1\n",
    "annotated": "from torch import nn\nnn.functional.pad: object = f\n",
    "deleted": SWIN + "del SwinLayer.maybe_pad\n",
    "module dictionary": "import torch\nvars(torch)['as_tensor'] = f\n",
    "setattr": "import torch\nsetattr(torch, 'as_tensor', f)\n",
    "setattr on a class": SWIN + "setattr(SwinLayer, 'forward', g)\n",
    "object.__setattr__": "import transformers\nobject.__setattr__(transformers.SwinModel, 'forward', g)\n",
    "delattr": "import torch\ndelattr(torch.nn.functional, 'pad')\n",
    "the class of an instance": "def f(module):\n    type(module).forward = g\n",
    "__class__ of an instance": "def f(module):\n    module.__class__.forward = g\n",
    "import inside a function": "def f():\n    import torch\n    torch.as_tensor = g\n",
    "alias inside a function": SWIN + "def f():\n    layer = SwinLayer\n    layer.forward = g\n",
    "method patching the module's import": "import torch\nclass A:\n    def f(self):\n        torch.linspace = g\n",
    "mock.patch.object": "with mock.patch.object(X, 'y', z):\n    pass\n",
    "unittest.mock import": "from unittest import mock\n",
    "patch import": "from unittest.mock import patch\n",
    "mock module": "import unittest.mock\n",
    "class of a library class": SWIN + "SwinLayer.__class__ = Meta\n",
    "unittest.mock attribute": "import unittest\nunittest.mock.patch('torch.linspace', f)\n",
}

FINE = {
    "instance attribute": "import torch\nclass A(torch.nn.Module):\n    def f(self):\n        self.x = torch.ones(1)\n",
    "instance class": SWIN + "class Own(SwinLayer):\n    pass\ndef f(module):\n    module.__class__ = Own\n",
    "own class": SWIN + "class Own(SwinLayer):\n    pass\nOwn.flag = True\n",
    "library call result": "import torch\nx = torch.zeros(3)\nx.requires_grad = True\n",
    "config of a model": "def f(model):\n    model.config.id2label = {}\n    setattr(model, 'rule', 1)\n",
    "new tensor attribute": "import torch\ntorch.empty(1).grad = None\n",
    "reading torch": "import torch\nlinspace = torch.linspace\nvalues = linspace(0, 1, 5)\n",
    "local names": "import torch\nfor layer in layers:\n    layer.weight = torch.nn.Parameter(w)\n",
    "a name reused in another function": (
        "import torch\ndef f():\n    dim = torch.export.Dim.DYNAMIC\n"
        "def g(dims):\n    for dim in dims:\n        dim.dim_param = 'height'\n"
    ),
    "a parameter shadowing an import": "from torch import nn\ndef f(nn):\n    nn.weight = None\n",
}


@pytest.mark.parametrize("case", sorted(PATCHES))
def test_the_check_catches_each_kind_of_patch(case):
    assert global_patches(PATCHES[case]), PATCHES[case]


@pytest.mark.parametrize("case", sorted(FINE))
def test_the_check_passes_ordinary_code(case):
    assert global_patches(FINE[case]) == []
