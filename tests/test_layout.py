"""Structural tests for the repository layout: pure ``ast`` parsing, no project imports.

Layering of ``util/`` (a module imports only util modules of its own layer or lower):
  0 core: the flat files util/*.py (errors, atomic, triple, runtime, ...)
  1 util/volume    2 util/data, util/nn    3 util/task
  4 util/train, util/evaluate (which must not import each other)    5 util/args.py
"""
import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UTIL = ROOT / "util"
MAX_LINES = 400
PACKAGE_LAYERS = {"volume": 1, "data": 2, "nn": 2, "task": 3, "train": 4, "evaluate": 4}
SKIP_DIRS = {"__pycache__", "demo_data", "output_dir"}
TASK_MODES = {"binary", "multiclass", "multilabel", "regression",
              "segmentation", "embedding", "classification"}
COMPARE_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
# Compared expressions (per file) whose string vocabulary merely overlaps the task modes.
NOT_TASK_MODES = {"util/data/path_table.py": {"kind"}}  # label-column kind: class/binary/float


@pytest.fixture(scope="session")
def one_thread():
    """Overrides conftest's autouse torch set-up: nothing here imports torch (keeps this file < 1 s)."""


def _tree_files(folder):
    """All .py files below ``folder``, skipping hidden, cache and output dirs."""
    for path in sorted(folder.rglob("*.py")):
        dirs = path.relative_to(ROOT).parts[:-1]
        if not any(d.startswith((".", "output_")) or d in SKIP_DIRS for d in dirs):
            yield path


def _root_files():
    return sorted(ROOT.glob("*.py"))


def _rel(path):
    return path.relative_to(ROOT).as_posix()


def _module_name(path):  # util/task/tasks.py -> util.task.tasks, util/nn/__init__.py -> util.nn
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _from_target(path, node, alias):
    """Module named by ``from base import alias``: base.alias if that is a util module, else base."""
    base = node.module or ""
    if node.level:  # relative import: resolve against the importer's package
        pkg = _module_name(path).split(".")[:None if path.name == "__init__.py" else -1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
    parts = f"{base}.{alias}".split(".")
    if base == "util" or (parts[0] == "util" and (ROOT.joinpath(*parts).with_suffix(".py").is_file()
                                                  or ROOT.joinpath(*parts).is_dir())):
        return ".".join(parts)
    return base


@functools.lru_cache(maxsize=None)
def _scan(path):
    """Parse ``path`` once and walk every node (function-level code included): returns the
    source lines, every import as (line, module) and every ast.Compare / ast.match_case node."""
    source = path.read_text(encoding="utf-8")
    imports, branches = [], []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            imports += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports += [(node.lineno, _from_target(path, node, a.name)) for a in node.names]
        elif isinstance(node, (ast.Compare, ast.match_case)):
            branches.append(node)
    return source.split("\n"), sorted(imports), branches  # "\n" as ast counts lines


def _layer(module, where):
    """(layer, concern package or None) of a ``util...`` module; fails on an unknown package."""
    parts = module.split(".")
    if len(parts) == 1 or (UTIL / f"{parts[1]}.py").is_file():
        return (5 if parts[1:2] == ["args"] else 0), None  # util/args.py: the CLI layer
    if parts[1] not in PACKAGE_LAYERS:
        pytest.fail(f"{where}: unknown package util/{parts[1]}/ - add it to PACKAGE_LAYERS "
                    f"in tests/test_layout.py")
    return PACKAGE_LAYERS[parts[1]], parts[1]


def test_no_source_file_is_over_400_lines():
    """No .py file in the root, util/, tests/ or bench/ is longer than 400 lines."""
    files = _root_files() + [p for d in ("util", "tests", "bench") for p in _tree_files(ROOT / d)]
    bad = [f"{_rel(p)}:{MAX_LINES + 1}: {n} lines, limit is {MAX_LINES}" for p in files
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not bad, "files over the line limit:\n" + "\n".join(bad)


def test_util_never_imports_a_top_level_module():
    """util/ is a library: it never imports a root module (main_*, models_*, engine_*, ...)."""
    top = {p.stem for p in _root_files()}
    bad = [f"{_rel(p)}:{line}: imports top-level module {mod!r}"
           for p in _tree_files(UTIL) for line, mod in _scan(p)[1] if mod.split(".")[0] in top]
    assert not bad, "util/ must not import top-level modules:\n" + "\n".join(bad)


def test_no_util_module_imports_a_higher_layer():
    """A util module imports only util modules of its own or a lower layer."""
    bad = []
    for path in _tree_files(UTIL):
        own, own_pkg = _layer(_module_name(path), _rel(path))
        for line, mod in (i for i in _scan(path)[1] if i[1].split(".")[0] == "util"):
            layer, pkg = _layer(mod, f"{_rel(path)}:{line}")
            where = f"{_rel(path)}:{line}: imports {mod} (layer {layer})"
            if layer > own:
                bad.append(f"{where} from layer {own}")
            elif {own_pkg, pkg} == {"train", "evaluate"}:
                bad.append(f"{where}: util/train and util/evaluate must not import each other")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_concern_packages_have_empty_init():
    """Every util/<pkg>/ has an empty __init__.py (no re-export facades)."""
    dirs = {d.name for d in UTIL.iterdir() if d.is_dir() and d.name not in SKIP_DIRS
            and not d.name.startswith(".")}
    inits = [UTIL / pkg / "__init__.py" for pkg in sorted(dirs | set(PACKAGE_LAYERS))]
    bad = [f"{_rel(i)}:1: missing" if not i.is_file() else f"{_rel(i)}:1: not empty (no re-export facades)"
           for i in inits if not i.is_file() or i.read_text(encoding="utf-8").strip()]
    assert not bad, "concern package __init__ problems:\n" + "\n".join(bad)


def _is_mode_literal(node):
    """A task-mode string constant, a tuple/list/set literal holding one, or a case pattern of one."""
    if isinstance(node, ast.MatchValue):
        return _is_mode_literal(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.MatchOr)):
        return any(map(_is_mode_literal, getattr(node, "elts", None) or getattr(node, "patterns", [])))
    return isinstance(node, ast.Constant) and node.value in TASK_MODES


def _segment(lines, node):
    """Source text of ``node`` on one line (ast.get_source_segment re-splits the file: too slow)."""
    rows = [line.encode() for line in lines[node.lineno - 1:node.end_lineno]]
    rows[-1] = rows[-1][:node.end_col_offset]
    rows[0] = rows[0][node.col_offset:]
    return " ".join(b"\n".join(rows).decode().split())


def test_no_task_mode_string_is_compared_outside_the_tasks_module():
    """Only util/task/tasks.py (and its torch-free util/task/flags.py) may branch on task-mode names such as "binary" (==, !=, in,
    not in, or a ``case`` pattern); everything else asks the task object."""
    bad = []
    for path in _root_files() + list(_tree_files(UTIL)):
        if path in (UTIL / "task" / "tasks.py", UTIL / "task" / "flags.py"):  # the tasks module, torch-free part
            continue
        lines, _, branches = _scan(path)
        exempt, hits = NOT_TASK_MODES.get(_rel(path), set()), []
        for node in branches:
            if isinstance(node, ast.match_case):
                hit, node = _is_mode_literal(node.pattern), node.pattern
            else:
                operands = [node.left, *node.comparators]
                hit = (any(isinstance(op, COMPARE_OPS) for op in node.ops)
                       and any(map(_is_mode_literal, operands))
                       and not any(_segment(lines, o) in exempt for o in operands))
            if hit:
                hits.append((node.lineno, f"{_rel(path)}:{node.lineno}: {_segment(lines, node)}"))
        bad += [msg for _, msg in sorted(hits)]
    assert not bad, "task-mode strings compared outside util/task/tasks.py and flags.py:\n" + "\n".join(bad)


RUN_FILES = {"checkpoint-last.pth", "checkpoint-best.pth", "mae_pretrained.pth", "log.txt", "args.json",
             "exit_status.json", "data_manifest.csv.gz", "test_metrics.json", "eval_metrics.json"}


def test_run_folder_file_names_are_spelt_in_run_folder_only():
    """Code that opens a run's file asks util/run_folder.py for its name; help texts and messages may mention it
    (string constants that merely contain the name), but no code builds a path from the bare name."""
    bad = []
    for path in [*_root_files(), *_tree_files(UTIL)]:
        if path == UTIL / "run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RUN_FILES:
                bad.append(f"{_rel(path)}:{node.lineno}: {node.value!r}")
    assert not bad, "run-folder file names spelt outside util/run_folder.py:\n" + "\n".join(bad)


def test_every_third_party_import_is_in_requirements():
    """A fresh install must give every package the code imports (tqdm was once imported but not listed): each
    third-party module imported by the scripts and util/ belongs to a distribution named in requirements.txt."""
    import importlib.metadata
    import re
    import sys

    listed = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower().replace("_", "-")
              for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()[:1].isalpha()}
    local = {p.stem for p in _root_files()} | {"util", "bench", "tests"}
    owners = importlib.metadata.packages_distributions()
    bad = set()
    for path in [*_root_files(), *_tree_files(UTIL)]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for top in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & listed:
                    bad.add(f"{_rel(path)}:{node.lineno}: {top} (distribution {', '.join(sorted(dists))})")
    assert not bad, "imported but not in requirements.txt:\n" + "\n".join(sorted(bad))


def test_documents_the_code_cites_exist():
    """Docstrings and comments cite documents by name (a design document's 'Model contract' that this repository never held
    was cited once): every such .md file exists; summary.md is main_evaluate.py's output, not a document."""
    import re

    outputs = {"summary.md"}
    bad = []
    for path in [*_root_files(), *_tree_files(UTIL), *_tree_files(ROOT / "tests"), *_tree_files(ROOT / "bench")]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for doc in re.findall(r"[\w./-]*\w\.md\b", line):
                if doc.split("/")[-1] not in outputs and not (ROOT / doc).is_file():
                    bad.append(f"{_rel(path)}:{n}: {doc}")
    assert not bad, "cited documents that do not exist:\n" + "\n".join(bad)


def _project_module(mod, top):
    """`mod` as a project module name (util.x.y, or a root module), or None for the standard library and packages."""
    parts = mod.split(".")
    if parts[0] in top:
        return parts[0]
    if parts[0] != "util":
        return None
    for n in range(len(parts), 1, -1):  # the longest prefix that is a module file or a package
        if ROOT.joinpath(*parts[:n]).with_suffix(".py").is_file() or ROOT.joinpath(*parts[:n]).is_dir():
            return ".".join(parts[:n])
    return "util"


def test_no_import_cycles():
    """Project modules import each other without cycles, imports inside functions included (a lazy import that
    closes a cycle hides a design problem; util/errors -> exit_status -> atomic -> errors was one)."""
    top = {p.stem for p in _root_files()}
    graph = {}
    for path in [*_root_files(), *_tree_files(UTIL)]:
        me = _module_name(path)
        deps = {_project_module(mod, top) for _, mod in _scan(path)[1]}
        graph[me] = sorted(d for d in deps if d and d != me and not me.startswith(d + "."))  # not a parent package
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(" <-> ".join(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


PARSE_STEP = {"parse", "parse_args", "presets", "apply_preset"}  # the functions that may change a Namespace


def test_nothing_writes_to_args_after_the_parse_step():
    """Flags become typed settings once, right after parsing: outside the parse step (util/args.py's parse and
    apply_preset, a script's parse_args and its presets) no code assigns to `args.X` or calls setattr(args, ...)."""
    bad = []
    for path in [*_root_files(), *_tree_files(UTIL)]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            if func.name in PARSE_STEP:
                continue
            inner = {id(n) for f in ast.walk(func) if f is not func and isinstance(f, ast.FunctionDef)
                     and f.name in PARSE_STEP for n in ast.walk(f)}
            for node in ast.walk(func):
                if id(node) in inner:
                    continue
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    for e in ast.walk(t):
                        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "args":
                            bad.append(f"{_rel(path)}:{node.lineno}: {func.name} writes args.{e.attr}")
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                        and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
                    bad.append(f"{_rel(path)}:{node.lineno}: {func.name} calls setattr(args, ...)")
    assert not bad, "writes to args after the parse step:\n" + "\n".join(sorted(set(bad)))


def test_file_names_are_built_in_the_run_folder_module_only():
    """A file name built in an f-string (literal parts without spaces, one of them with a file extension, e.g.
    f"checkpoint-{n}.pth") appears only in util/run_folder.py, where every name a script writes is spelt."""
    ext = re.compile(r"\.(pth|pt|json|txt|png|csv|gz|npy|nii|nrrd|mha|vol|lock|md|onnx|safetensors)\b")
    bad = []
    for path in [*_root_files(), *_tree_files(UTIL)]:
        if _rel(path) == "util/run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.JoinedStr):
                continue
            parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            if parts and not any(c.isspace() for p in parts for c in p) and any(ext.search(p) for p in parts):
                bad.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "file names built outside util/run_folder.py:\n" + "\n".join(bad)
