"""YAML and JSON documents parsed strictly: a typo or a trick is an error naming the file, not a surprise.

- A key given twice in one mapping is an error (PyYAML and json keep the last one silently, so a
  second `tasks:` block would drop the first).
- A document that expands past `MAX_VALUES` values through YAML aliases (a "billion laughs" bomb:
  a few lines that expand to billions of items) or nests deeper than `MAX_DEPTH` is refused before
  anything walks or prints it.
"""
from __future__ import annotations

import json

import yaml

from gallery.errors import ContractError, Violation, excerpt

MAX_VALUES = 100_000  # a task spec of hundreds of tasks holds a few thousand
MAX_DEPTH = 50


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {excerpt(key)} is given twice (first on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _no_duplicate_pairs(pairs):
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"key {excerpt(repeated[0])} is given twice in one object")
    return dict(pairs)


def parse_document(text: str, path: str, fmt: str, example: str) -> object:
    """The YAML (`fmt` 'yaml') or JSON document in `text`, or ContractError naming `path`; `example`
    is the file to compare with, for the fix."""
    try:
        if fmt == "json":
            doc = json.loads(text, object_pairs_hook=_no_duplicate_pairs)
        else:
            doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as e:
        raise ContractError([Violation(path, "file", f"not valid {fmt.upper()}: {excerpt(str(e), 400, quote=False)}",
                                       f"fix the syntax (see {example})")]) from None
    except RecursionError:
        raise ContractError([Violation(path, "file", "nested deeper than Python can parse",
                                       f"flatten the document (see {example})")]) from None
    problem = _size_problem(doc)
    if problem:
        raise ContractError([Violation(path, "file", problem, f"write the values out plainly (see {example})")])
    return doc


def _size_problem(doc) -> str | None:
    """Why the document is too big to walk (counting every value an alias repeats), or None; stops
    counting at the limit, so a bomb costs MAX_VALUES steps, not its expanded size."""
    count, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"expands to more than {MAX_VALUES:,} values (YAML aliases repeating a block many times?)"
        if depth > MAX_DEPTH:
            return f"nests deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None
