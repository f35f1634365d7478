"""The package's layers, read from its import statements (function-level imports included): no import circles,
configurations that import no modeling code, and model code (what a saved folder carries to the Hub) that reaches no
tool of the package and no library a remote-code user lacks."""

import ast
import sys
from pathlib import Path

import offseg_hf

PACKAGE = Path(offseg_hf.__file__).parent
# What a saved folder's code may import besides itself: transformers' remote-code loading installs nothing.
MODEL_CODE_LIBRARIES = {"torch", "transformers", "timm", "safetensors"}
# The package's tools: they import the models, never the other way round.
TOOLS = ("convert", "export", "hub", "data", "evaluation", "training", "analysis", "presets")


def module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(package modules each module imports, top-level names of the other modules it imports)."""
    internal, external = {}, {}
    for path in PACKAGE.rglob("*.py"):
        if "templates" in path.parts or "evaluate_metric" in path.parts:
            continue  # files copied into other folders, loaded there on their own
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found, libraries = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {f"{target}.{alias.name}" for alias in node.names} if node.module is None else {target}
            elif isinstance(node, ast.ImportFrom) and node.module:
                (found if node.module.startswith("offseg_hf") else libraries).add(node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    (found if alias.name.startswith("offseg_hf") else libraries).add(alias.name)
        internal[name], external[name] = found, {library.split(".")[0] for library in libraries}

    def resolve(target: str) -> str:  # `from .x import name` names a module or something in one
        while target not in internal and "." in target:
            target = target.rpartition(".")[0]
        return target

    graph = {name: {resolve(target) for target in found} - {name, "offseg_hf"} for name, found in internal.items()}
    return graph, external


GRAPH, EXTERNAL = read_imports()


def reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(GRAPH[name])
    return seen


def test_the_import_graph_has_no_circle():
    circles = sorted(
        (name, other) for name in GRAPH for other in GRAPH[name] if other != name and name in reachable(other)
    )
    assert not circles, f"modules that reach each other: {circles}"


def test_configurations_import_no_modeling_code():
    for name, imported in GRAPH.items():
        if name.rpartition(".")[2].startswith("configuration_"):
            others = {module for module in imported if not module.rpartition(".")[2].startswith("configuration_")}
            assert not others, f"{name} imports {sorted(others)}"


def test_model_code_is_the_models_folder_and_reaches_no_tool_and_only_the_model_libraries():
    carried = reachable("offseg_hf.models.modeling_offseg") | reachable("offseg_hf.models.modeling_mask2former")
    # Everything a saved folder carries lives in offseg_hf/models/ (transformers copies one folder's relative imports).
    assert {name.rpartition(".")[0] for name in carried} == {"offseg_hf.models"}, sorted(carried)
    assert not {name for name in carried if any(name.startswith(f"offseg_hf.{tool}") for tool in TOOLS)}
    standard = set(sys.stdlib_module_names) | {"__future__"}
    for name in carried:
        assert EXTERNAL[name] - standard <= MODEL_CODE_LIBRARIES, (name, EXTERNAL[name] - standard)


def test_model_files_import_their_neighbours_one_level_only():
    """transformers' remote-code loader copies the files named by `from .x import y` beside the weights; a deeper or
    absolute import of the package would not be copied."""
    for path in (PACKAGE / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), (path.name, node.module)
                # `from . import x` is not followed by the loader either: name the module (`from .x import y`).
                assert node.level == 0 or node.module, (path.name, [alias.name for alias in node.names])
                assert node.level == 1 or not (node.module or "").startswith("offseg_hf"), (path.name, node.module)


def test_training_does_not_import_conversion_and_the_models_import_no_tool():
    """Training takes the converter's parameter names as an argument (examples/train.py passes them)."""
    for name in [name for name in GRAPH if name.startswith("offseg_hf.training")]:
        assert not {other for other in reachable(name) if other.startswith("offseg_hf.convert")}, name
    for name in [name for name in GRAPH if name.startswith("offseg_hf.models")]:
        assert not {other for other in GRAPH[name] if not other.startswith("offseg_hf.models")}, name


def test_the_graph_reader_sees_imports():
    # The checks above mean something only if the reader finds edges, function-level ones included.
    assert "offseg_hf.models.configuration_offseg" in GRAPH["offseg_hf.models.modeling_offseg"]
    assert "offseg_hf.evaluation.inference" in GRAPH["offseg_hf.training.loop"]  # inside a function
    assert "offseg_hf.presets" in GRAPH["offseg_hf.convert.official"]
    assert EXTERNAL["offseg_hf.models.modeling_offseg"] >= {"torch", "transformers"}
