"""Safe, bounded YAML loading that remembers the line of every field.

Only plain YAML becomes data: mappings, sequences, numbers, strings, booleans and null. Any
tag that would build an object (``!!python/...``, ``!!set``, custom tags) is rejected, and
nothing in the file is ever executed. Aliases are counted before they are expanded, so an alias bomb
stops within milliseconds instead of filling the memory. Duplicate keys are rejected rather
than silently overwritten. Numbers follow YAML 1.2, so ``1e-5`` is a float (PyYAML alone
reads it as a string), and a date such as ``2024-01-31`` stays text, as in YAML 1.2.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import Problem

MAX_FILE_BYTES = 16 * 2**20
MAX_NODES = 2_000_000  # scalars and collections after alias expansion

_STANDARD_TAGS = {
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats such as 1e-5."""


_Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class YamlError(Exception):
    """The file is not loadable YAML data; carries one located problem."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(problem.message)


def load(text: str) -> tuple[Any, dict[tuple, int]]:
    """Parse ``text``; return the data and a map from each field path to its 1-based line."""
    if len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        raise YamlError(Problem((), f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB"))
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as err:  # the reader checks the whole text up front
        line = text.count("\n", 0, err.position) + 1
        raise YamlError(
            Problem((), f"YAML syntax error: the control character #x{err.character:04x} is not allowed", line)
        ) from None
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        context = err.context
        if context and err.context_mark and mark and err.context_mark.line != mark.line:
            context += f" (from line {err.context_mark.line + 1})"  # an unclosed quote or bracket
        message = " ".join(filter(None, [context, err.problem]))
        raise YamlError(Problem((), f"YAML syntax error: {message}", mark.line + 1 if mark else None)) from None
    except yaml.YAMLError as err:
        raise YamlError(Problem((), f"YAML syntax error: {err}")) from None
    except RecursionError:
        raise YamlError(Problem((), "the document is nested too deeply")) from None
    finally:
        loader.dispose()
    if root is None:
        raise YamlError(Problem((), "the file is empty; expected a mapping with at least lr, loss, inputs, targets and layers"))
    lines: dict[tuple, int] = {}
    try:
        _check_size(root)
        data = _build(root, (), lines, loader)
    except RecursionError:
        raise YamlError(Problem((), "the document is nested too deeply")) from None
    return data, lines


def _short(tag: str) -> str:
    """'tag:yaml.org,2002:python/name:os.system' -> '!!python/name:os.system', as written."""
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


def _count(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` becomes once every alias is expanded, counted without expanding."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise YamlError(
            Problem((), "an alias refers to a collection that contains it (a recursive structure)", node.start_mark.line + 1)
        )
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_count(k, memo, open_nodes) + _count(v, memo, open_nodes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_count(item, memo, open_nodes) for item in node.value)
    else:
        size = 1
    open_nodes.discard(id(node))
    memo[id(node)] = size
    return size


def _check_size(root: yaml.Node) -> None:
    """Reject an alias bomb before expanding it, naming the top-level field that explodes."""
    memo: dict[int, int] = {}
    if _count(root, memo, set()) <= MAX_NODES:
        return
    path: tuple = ()
    line = root.start_mark.line + 1
    if isinstance(root, yaml.MappingNode) and root.value:
        key, _ = max(root.value, key=lambda kv: memo[id(kv[1])])
        path, line = (key.value,), key.start_mark.line + 1
    raise YamlError(Problem(path, f"the document expands to more than {MAX_NODES:,} values (an alias bomb?)", line))


def _build(node: yaml.Node, path: tuple, lines: dict, loader: _Loader) -> Any:
    """Plain data from a node whose expanded size _check_size has bounded."""
    line = node.start_mark.line + 1
    lines.setdefault(path, line)
    if node.tag not in _STANDARD_TAGS:
        raise YamlError(Problem(path, f"the tag {_short(node.tag)!r} is not allowed; a case file holds plain data only", line))
    kind = {"tag:yaml.org,2002:map": yaml.MappingNode, "tag:yaml.org,2002:seq": yaml.SequenceNode}.get(node.tag, yaml.ScalarNode)
    if not isinstance(node, kind):
        # A composed node is a scalar, a sequence or a mapping node, each with its id; the base Node has none.
        raise YamlError(Problem(path, f"the tag {_short(node.tag)!r} does not fit a {node.id}", line))  # type: ignore[attr-defined]
    if isinstance(node, yaml.MappingNode):
        result: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(
                    Problem(path, "merge keys (<<) are not supported; write the fields out", key_node.start_mark.line + 1)
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(Problem(path, "a mapping key must be a plain name", key_node.start_mark.line + 1))
            key = _build(key_node, path, {}, loader)
            if not isinstance(key, str):
                raise YamlError(
                    Problem(
                        path,
                        f"a mapping key must be a name, found {key!r}; quote it to use it as a name",
                        key_node.start_mark.line + 1,
                    )
                )
            if key in result:
                raise YamlError(
                    Problem((*path, key), f"the key {key!r} appears twice in this mapping", key_node.start_mark.line + 1)
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _build(value_node, (*path, key), lines, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, loader) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node)
    except (ValueError, KeyError, yaml.YAMLError):  # an explicit tag on the wrong text: !!int abc
        raise YamlError(Problem(path, f"{node.value!r} is not a valid {_short(node.tag)}", line)) from None
