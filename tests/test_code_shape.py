"""The shape of the serving code, checked: short modules and functions, BentoML's internals in one module,
the environment read in one module.

- No module under service/ is over 350 lines, no function or method over 60 (``def`` line to its last).
  Generated code (``service/http/v2/proto/*_pb2*.py``) is exempt.
- ``bentoml._internal`` appears in one module only, service/http/bento.py, and nothing else imports
  BentoML's private packages or writes SQL against BentoML's task table.
- Only service/settings.py reads ``IMGCLF_*`` variables from the environment.

Each checker is a function of (path, source) returning its offenders, and is shown a planted violation
below, so these tests can fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
BENTO = "service/http/bento.py"  # the one module that may use BentoML's private API
SETTINGS = "service/settings.py"  # the one module that may read IMGCLF_* variables
PRIVATE = ("bentoml._internal", "_bentoml_impl", "_bentoml_sdk")  # BentoML's private packages
TASK_TABLE_SQL = re.compile(r"\b(UPDATE|INTO|FROM|TABLE)\s+result\b")  # BentoML's task table


def _generated(name: str) -> bool:
    return name.startswith("service/http/v2/proto/") and "_pb2" in name


def service_modules() -> dict[str, str]:
    """Every hand-written module under service/: its path from the root -> its source."""
    found = {}
    for path in sorted((ROOT / "service").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if not _generated(name):
            found[name] = path.read_text(encoding="utf-8")
    return found


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method, nested ones included, with its qualified name."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def shape_offenders(name: str, source: str) -> list[str]:
    """A module over MAX_MODULE_LINES lines; each function over MAX_FUNCTION_LINES (``def`` to its end)."""
    offenders = []
    if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
        offenders.append(f"{name}: module of {lines} lines (limit {MAX_MODULE_LINES})")
    for qualname, node in _functions(ast.parse(source, name)):
        if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
            offenders.append(f"{name}:{node.lineno} {qualname}: {length} lines (limit {MAX_FUNCTION_LINES})")
    return offenders


def private_api_offenders(name: str, source: str) -> list[str]:
    """Imports of BentoML's private packages and SQL on BentoML's task table (allowed in BENTO only)."""
    offenders = []
    for node in ast.walk(ast.parse(source, name)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        if private := [m for m in modules if any(m == p or m.startswith(p + ".") for p in PRIVATE)]:
            offenders.append(f"{name}:{node.lineno} imports BentoML's private API ({private[0]})")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and TASK_TABLE_SQL.search(node.value):
            offenders.append(f"{name}:{node.lineno} SQL on BentoML's task table: {node.value.strip()[:60]!r}")
    return offenders


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ")


def _variable(node: ast.AST, constants: dict[str, str]) -> str | None:
    """The name of the environment variable ``node`` spells, as far as it is a literal prefix."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr) and node.values:  # f"IMGCLF_{name}"
        return _variable(node.values[0], constants)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "IMGCLF_" + name
        return _variable(node.left, constants)
    return None


def _read_keys(node: ast.AST) -> list[ast.AST]:
    """The keys an environment read looks up at ``node``: os.environ[k], os.environ.get(k) (and .pop,
    .setdefault), os.getenv(k), k in os.environ."""
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        return [node.slice]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and _is_environ(func.value):
            return [node.args[0]]
        if (isinstance(func, ast.Attribute) and func.attr == "getenv" and isinstance(func.value, ast.Name)
                and func.value.id == "os") or (isinstance(func, ast.Name) and func.id == "getenv"):
            return [node.args[0]]
    if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
            and any(_is_environ(c) for c in node.comparators):
        return [node.left]
    return []


def env_offenders(name: str, source: str) -> list[str]:
    """Reads of IMGCLF_* environment variables (allowed in SETTINGS only)."""
    tree = ast.parse(source, name)
    constants = {target.id: node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    offenders = []
    for node in ast.walk(tree):
        for key in _read_keys(node):
            if (variable := _variable(key, constants)) and variable.startswith("IMGCLF_"):
                offenders.append(f"{name}:{node.lineno} reads {variable} from the environment")
    return offenders


# --- the checks on the code ----------------------------------------------------------------------------


def test_modules_and_functions_are_short() -> None:
    offenders = [o for name, source in service_modules().items() for o in shape_offenders(name, source)]
    assert not offenders, (f"{len(offenders)} over the limits ({MAX_MODULE_LINES} lines a module, "
                           f"{MAX_FUNCTION_LINES} a function):\n" + "\n".join(offenders))


def test_bentoml_internals_stay_in_one_module() -> None:
    modules = service_modules()
    naming = sorted(name for name, source in modules.items() if "bentoml._internal" in source)
    offenders = [o for name, source in modules.items() if name != BENTO for o in private_api_offenders(name, source)]
    if naming != [BENTO]:
        offenders.insert(0, f"`bentoml._internal` appears in {naming}, not in {BENTO} alone")
    assert not offenders, f"BentoML's private API used outside {BENTO}:\n" + "\n".join(offenders)


def test_only_settings_reads_imgclf_variables() -> None:
    offenders = [o for name, source in service_modules().items() if name != SETTINGS
                 for o in env_offenders(name, source)]
    assert not offenders, f"IMGCLF_* read outside {SETTINGS} (add a Settings field instead):\n" + "\n".join(offenders)


# --- the checkers, shown planted violations ---------------------------------------------------------------


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines, ``def`` included."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}():\n{body}{indent}    return None\n"


def test_the_shape_checker_reports_a_planted_long_function_and_module() -> None:
    source = (_function("fits", MAX_FUNCTION_LINES) + "\n\nclass Box:\n    @staticmethod\n"
              + _function("too_long", MAX_FUNCTION_LINES + 1, indent="    ").replace("def ", "async def ", 1))
    offenders = shape_offenders("planted.py", source)
    assert offenders == [f"planted.py:65 Box.too_long: 61 lines (limit {MAX_FUNCTION_LINES})"], offenders
    assert shape_offenders("long.py", "x = 1\n" * (MAX_MODULE_LINES + 1)) == [
        f"long.py: module of {MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES})"]
    assert shape_offenders("fits.py", "x = 1\n" * MAX_MODULE_LINES) == []


def test_the_private_api_checker_reports_planted_uses() -> None:
    source = ("import bentoml\nfrom bentoml.validators import ContentType\n"
              "from bentoml._internal.configuration.containers import BentoMLContainer\n"
              "from bentoml import _internal\nimport _bentoml_impl.tasks.result\n"
              "SQL = \"UPDATE result SET status = 'failed' WHERE task_id = ?\"\n")
    lines = [o.split()[0] for o in private_api_offenders("planted.py", source)]
    assert lines == ["planted.py:3", "planted.py:4", "planted.py:5", "planted.py:6"], lines


def test_the_environment_checker_reports_planted_reads() -> None:
    source = ("import os\nfrom os import environ, getenv\nNAME = 'IMGCLF_C'\n"
              "a = os.environ.get('IMGCLF_A')\nb = os.getenv('IMGCLF_B', '1')\nc = os.environ[NAME]\n"
              "d = 'IMGCLF_D' in os.environ\ne = environ.get(f'IMGCLF_{a}')\nf = getenv('IMGCLF_' + b)\n"
              "ok = os.environ.get('HOME'), 'IMGCLF_X is a message', os.environ.get('MALLOC_ARENA_MAX')\n")
    offenders = env_offenders("planted.py", source)
    assert [o.split()[0] for o in offenders] == [f"planted.py:{n}" for n in range(4, 10)], offenders
