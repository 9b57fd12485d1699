"""Read a recipe file into a `Recipe`, or say what is wrong with it, line by line.

pydantic checks the values; this module reads the YAML twice (as nodes, which know their
line, and as plain data) so that each error names the file, the line, the key path as
written (`stages[2] (prune).ratio`), the rule, and the allowed keys or values.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from penjing.errors import PenjingWarning
from penjing.recipes.schema import (
    CHOOSER,
    PRUNE,
    QUANTIZE,
    RENAMED,
    TAGS,
    Recipe,
    RecipeError,
    check_order,
    stage_names,
    stage_tag,
)
from penjing.spec import import_plugins, on_path

# A recipe is a page or two of YAML. The bounds keep a hostile or mistaken file from
# costing more than a fraction of a second: its bytes, and the nodes it stands for once
# every alias (`*name`) and merge key (`<<`) is expanded, which is what validation walks.
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_NODES = 100_000
MAX_RECIPE_DEPTH = 64
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when it is installed


@contextlib.contextmanager
def beside(base: Path) -> Iterator[None]:
    """Modules a recipe names ('package.module:function', plugins) are imported from the
    recipe's folder first, then the current directory, then the Python path: the rule
    `find` follows for files."""
    with on_path(Path.cwd()), on_path(base):
        yield


def find(base: Path, name: str) -> Path:
    """The file a recipe names by `name` (weights): itself when absolute, else beside the
    recipe (in `base`) first, then in the current directory; a FileNotFoundError naming
    both places when it is in neither."""
    path = Path(name)
    if path.is_absolute():
        return path
    for folder in dict.fromkeys((base.resolve(), Path.cwd().resolve())):
        if (folder / path).exists():
            return folder / path
    raise FileNotFoundError(
        f"{name!r} does not exist beside the recipe (in {str(base.resolve())!r}) nor in the "
        f"current directory ({str(Path.cwd().resolve())!r}); relative paths in a recipe are "
        "looked up in that order")


def _where(path: str | os.PathLike | None) -> str:
    return Path(path).name if path is not None else "recipe"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_size(root: yaml.Node, where: str) -> None:
    """A RecipeError for a recipe that refers to itself, nests deeper than
    MAX_RECIPE_DEPTH, or expands to more than MAX_RECIPE_NODES nodes.

    An alias is the node it names, so a few hundred bytes can stand for billions of
    nodes; each distinct node is visited once here and its expanded size summed from its
    children's, so the check costs the file's size, not the expansion's.
    """
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_RECIPE_NODES:
                raise RecipeError(
                    f"{where} line {node.start_mark.line + 1}: the recipe stands for more than "
                    f"{MAX_RECIPE_NODES:,} values once its aliases (*name) and merge keys (<<) "
                    "are expanded; write the stages out, or share less through anchors")
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            raise RecipeError(f"{where} line {node.start_mark.line + 1}: an alias refers to "
                              "the value that contains it; a recipe cannot contain itself")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where} line {node.start_mark.line + 1}: values nest more "
                              f"than {MAX_RECIPE_DEPTH} levels deep; a recipe needs a few")
        open_nodes.add(id(node))
        stack.append((node, depth, True))
        stack += [(c, depth + 1, False) for c in _children(node)]


def _check_keys(root: yaml.Node, where: str) -> None:
    """A RecipeError for a key written twice in one mapping (YAML would keep the last).
    Each distinct node is checked once: an alias repeats a mapping already checked."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, _ in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name in seen:
                    raise RecipeError(f"{where} line {key.start_mark.line + 1}: key {name!r} "
                                      f"is written twice (first on line {seen[name]}); keep one")
                seen[name] = key.start_mark.line + 1
        stack += _children(node)


def _node_at(root: yaml.Node | None, path: list) -> tuple[yaml.Node | None, yaml.Node | None]:
    """(the value node at `path`, the key node that names it) as far as the path goes."""
    node, key_node = root, None
    for step in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == str(step)]
            if not match:
                return node, key_node
            key_node, node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(
            node.value
        ):
            key_node, node = None, node.value[step]
        else:
            break
    return node, key_node


def _line(root: yaml.Node | None, path: list, on_key: bool = False) -> int | None:
    node, key_node = _node_at(root, path)
    chosen = key_node if on_key and key_node is not None else node
    return None if chosen is None else chosen.start_mark.line + 1


def _yaml_path(data: Any, loc: tuple, missing: bool = False) -> list:
    """`loc` without pydantic's own steps (a stage's class tag, a union member's type):
    the keys and indices as they are in the file, plus the key a `missing` error names."""
    path, here = [], data
    for i, step in enumerate(loc):
        in_map = isinstance(here, dict) and step in here
        in_list = isinstance(here, list) and isinstance(step, int) and step < len(here)
        if in_map or in_list:
            path.append(step)
            here = here[step]
        elif missing and i == len(loc) - 1:
            path.append(step)
        # else: a tag or a union branch ('constrained-float'), not a key of the file
    return path


def _label(data: Any, path: list) -> str:
    """`stages[2] (prune).ratio` for ['stages', 2, 'ratio']."""
    text, here = "", data
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
            here = here[step] if isinstance(here, list) and step < len(here) else None
            kind = here.get("stage") if isinstance(here, dict) else None
            if isinstance(kind, str):
                text += f" ({kind})"
        else:
            text += f".{step}" if text else str(step)
            here = here.get(step) if isinstance(here, dict) else None
    return text


def _model_at(data: Any, path: list) -> type[BaseModel]:
    """The schema class of the mapping at `path` (the recipe, or one of its stages)."""
    if len(path) >= 2 and path[0] == "stages" and isinstance(path[1], int):
        stages = data.get("stages") if isinstance(data, dict) else None
        if isinstance(stages, list) and path[1] < len(stages):
            tag = stage_tag(stages[path[1]])
            if tag in TAGS:
                return TAGS[tag]
    return Recipe


def _near(word: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(word), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _stage_problem(data: Any, root: yaml.Node | None, path: list, where: str) -> str:
    """The message for a stage whose kind (or structure / method) is missing or unknown."""
    stage = data["stages"][path[1]]
    label = _label(data, path)
    names = stage_names()
    if not isinstance(stage, dict):
        return (f"{where} line {_line(root, path)}: {label}: a stage must be a mapping with "
                f"a 'stage' key, got {stage!r}; stages: {', '.join(names)}")
    kind = stage.get("stage")
    if kind is None:
        return (f"{where} line {_line(root, path)}: {label}: missing key 'stage'; "
                f"give one of {', '.join(names)}")
    if kind not in names:
        return (f"{where} line {_line(root, [*path, 'stage'])}: {label}.stage: unknown stage "
                f"{kind!r}{_near(kind, names)}; allowed: {', '.join(names)}")
    key, _ = CHOOSER[kind]
    allowed = list(PRUNE if kind == "prune" else QUANTIZE)
    if key not in stage:
        return (f"{where} line {_line(root, path)}: {label}: missing key {key!r}; give one "
                f"of {', '.join(allowed)}")
    return (f"{where} line {_line(root, [*path, key])}: {label}.{key}: unknown {kind} {key} "
            f"{stage[key]!r}{_near(stage[key], allowed)}; allowed: {', '.join(allowed)}")


def _message(err: dict, data: Any, root: yaml.Node | None, where: str) -> tuple[list, str]:
    """(the key path, one line saying what is wrong) for one pydantic error."""
    kind = err["type"]
    path = _yaml_path(data, err["loc"], missing=kind == "missing")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return path, _stage_problem(data, root, path, where)
    label = _label(data, path)
    if kind == "extra_forbidden":
        allowed = list(_model_at(data, path[:-1]).model_fields)
        return path, (
            f"{where} line {_line(root, path, on_key=True)}: {_label(data, path[:-1]) or 'recipe'}"
            f": unknown key {path[-1]!r}{_near(path[-1], allowed)}; allowed: {', '.join(allowed)}"
        )
    if kind == "missing":
        owner = _label(data, path[:-1]) or "recipe"
        return path, (f"{where} line {_line(root, path[:-1])}: {owner}: missing key "
                      f"{path[-1]!r}")
    text = err["msg"]
    for step in reversed(path):  # "ratio must be ..." after "stages[1] (prune).ratio: "
        if isinstance(step, str) and text.startswith(f"Value error, {step} "):
            text = "Value error, " + text[len(f"Value error, {step} "):]
            break
    for old, new in (("Input should be", "must be"), ("Value error, ", ""),
                     ("List should have at least 1 item after validation, not 0",
                      "must list at least one")):
        text = text.replace(old, new)
    value = err.get("input")
    if kind != "value_error":
        text += (f", got {value!r}" if not isinstance(value, dict | list)
                 else f", got a {'mapping' if isinstance(value, dict) else 'list'}")
    return path, f"{where} line {_line(root, path)}: {label or 'recipe'}: {text}"


def _messages(error: ValidationError, data: Any, root: yaml.Node | None, where: str) -> list[str]:
    """One line per problem; of the errors a union (`0.5` or {layer: 0.5}) reports for one
    value, those saying 'wrong type' are dropped when another branch says more."""
    found: dict[tuple, list[tuple[str, str]]] = {}
    for err in error.errors():
        path, text = _message(err, data, root, where)
        found.setdefault(tuple(map(str, path)), []).append((err["type"], text))
    lines = []
    for key, entries in found.items():
        deeper = any(other[: len(key)] == key and len(other) > len(key) for other in found)
        telling = [t for kind, t in entries if not kind.endswith("_type")]
        if not telling and not deeper:
            telling = [entries[0][1]]
        lines += list(dict.fromkeys(telling))
    return lines


def _import_plugins(data: dict, root: yaml.Node | None, where: str, base: Path | None) -> None:
    """Import the modules the recipe's `plugins` names, so their steps can be stages."""
    names = data.get("plugins")
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError(f"{where} line {_line(root, ['plugins'])}: plugins: must be a list "
                          f"of module names, got {names!r}")
    try:
        if base is None:
            import_plugins(names)
        else:
            with beside(base):
                import_plugins(names)
    except ValueError as err:
        raise RecipeError(f"{where} line {_line(root, ['plugins'])}: plugins: {err}") from None


def _renamed(data: dict, root: yaml.Node | None, where: str) -> None:
    """Read the keys earlier releases took under their new names, with a warning each
    (a `granularity` is a `structure`, `first: false` is `skip_first: true`, and
    `per_channel: false` is `granularity: tensor`)."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        table = RENAMED.get(stage.get("stage"), {}) if isinstance(stage.get("stage"), str) \
            else {}
        for old in [k for k in stage if k in table and table[k] not in stage]:
            new = table[old]
            value = stage.pop(old)
            if old in ("first", "last") and isinstance(value, bool):
                value = not value
            elif old == "per_channel" and isinstance(value, bool):
                value = "channel" if value else "tensor"
            elif old == "calib_batches" and isinstance(value, int):
                value *= data.get("batch_size", 64) if isinstance(
                    data.get("batch_size", 64), int) else 64
            stage[new] = value
            warnings.warn(f"{where} line {_line(root, ['stages', i, old], on_key=True)}: "
                          f"{_label(data, ['stages', i])}.{old} is now {new}; read as "
                          f"{new}: {value!r}", PenjingWarning, stacklevel=3)


def _check_order(data: dict, root: yaml.Node | None, where: str) -> None:
    """The schema's stage-order rule, with the line of the stage that breaks it."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return
    kinds = []
    for stage in stages:
        kind = stage.get("stage") if isinstance(stage, dict) else None
        if kind == "quantize":
            kind = f"quantize:{stage.get('method')}"
        kinds.append(kind if isinstance(kind, str) else "")
    try:
        check_order(kinds)
    except ValueError as err:
        at = int(str(err).split("]", 1)[0].removeprefix("stages["))
        raise RecipeError(f"{where} line {_line(root, ['stages', at])}: {err}") from None


def parse(text: str, where: str = "recipe", base: Path | None = None) -> Recipe:
    """A `Recipe` from YAML `text`; `where` names it in errors (a file name), and `base`
    is the folder its plugins are imported from (with the current directory)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: {len(text):,} characters, more than a recipe's "
                          f"{MAX_RECIPE_BYTES:,}; is this the recipe file?")
    try:
        root = yaml.compose(text, Loader=_Loader)
        if root is not None:
            _check_size(root, where)
            _check_keys(root, where)
        data = yaml.load(text, Loader=_Loader)  # a safe loader: plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{where}{line}: not valid YAML ({problem})") from err
    except RecursionError:
        raise RecipeError(f"{where}: values nest too deep to read; a recipe needs a few "
                          "levels") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with at least 'model' and "
                          f"'stages', got {type(data).__name__}; see examples/recipes/")
    _import_plugins(data, root, where, base)
    _renamed(data, root, where)
    _check_order(data, root, where)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = _messages(err, data, root, where)
        head = lines[0] if len(lines) == 1 else f"{where}: {len(lines)} problems\n  " + \
            "\n  ".join(lines)
        raise RecipeError(head) from None


def load(path: str | os.PathLike) -> Recipe:
    """The recipe in the YAML file at `path`, checked before anything runs.

    Any problem is a `RecipeError` (a ValueError) naming the file, line, key and the
    allowed keys or values:

        recipe.yaml line 12: stages[2] (prune).ratio: must be less than 1, got 1.5
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"recipe {str(path)!r} is a folder; give the YAML file")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path.name}: {path.stat().st_size:,} bytes, more than a "
                              f"recipe's {MAX_RECIPE_BYTES:,}; is this the recipe file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path.name}: not a text file ({err.reason} at byte {err.start}); "
                          "a recipe is YAML, see examples/recipes/") from err
    return parse(text, _where(path), path.resolve().parent)
