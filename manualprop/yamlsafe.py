"""Safe, bounded YAML loading that remembers the line of every field.

Only plain YAML becomes data: mappings, sequences, numbers, strings, booleans and null. Any
tag that would build an object (``!!python/...``, ``!!set``, custom tags) is rejected, and
nothing in the file is ever executed. Aliases are expanded with a budget, so an alias bomb
stops within milliseconds instead of filling the memory. Duplicate keys are rejected rather
than silently overwritten. Numbers follow YAML 1.2, so ``1e-5`` is a float (PyYAML alone
reads it as a string).
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
    key: list(resolvers) for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
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
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        message = " ".join(filter(None, [err.context, err.problem]))
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
    budget = [MAX_NODES]
    try:
        data = _build(root, (), lines, budget, loader)
    except RecursionError:
        raise YamlError(Problem((), "the document is nested too deeply")) from None
    return data, lines


def _build(node: yaml.Node, path: tuple, lines: dict, budget: list, loader: _Loader) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError(Problem(path, f"the document expands to more than {MAX_NODES:,} values (an alias bomb?)", node.start_mark.line + 1))
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _STANDARD_TAGS:
        raise YamlError(Problem(path, f"the tag {node.tag!r} is not allowed; a case file holds plain data only", node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        result: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(Problem(path, "a mapping key must be a plain name", key_node.start_mark.line + 1))
            key = _build(key_node, path, {}, budget, loader)
            if key in result:
                raise YamlError(Problem((*path, key), f"the key {key!r} appears twice in this mapping", key_node.start_mark.line + 1))
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _build(value_node, (*path, key), lines, budget, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, budget, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node)
