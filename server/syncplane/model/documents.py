"""Reading Workflow YAML safely: bounded in size, depth, aliases and expanded size.

``yaml.safe_load`` builds no objects of arbitrary types, but an alias bomb ("billion laughs")
or thousands of nested brackets still hang or crash whatever walks the result. PyYAML has no
limits of its own, hence this loader (the same bounds as Kubernetes' own YAML decoding in
spirit: sigs.k8s.io/yaml refuses excessive aliasing)."""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1024 * 1024          # a file of workflows; the largest spec is a few KiB
MAX_DEPTH = 64                   # nesting of mappings and sequences
MAX_ALIASES = 100                # alias references (``*name``) per document
MAX_EXPANDED_NODES = 100_000     # nodes once every alias is expanded


class DocumentError(ValueError):
    """Input refused before it is interpreted; ``str()`` says which bound and where."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_document(self) -> Any:
        self._aliases = 0
        node = super().compose_document()
        if node is not None:
            _check_expanded(node)
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise DocumentError(f"more than {MAX_ALIASES} aliases in one document (line {mark.line + 1})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise DocumentError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expanded(root: yaml.Node) -> None:
    """The node count with every alias expanded, computed once per distinct node (an alias bomb
    has few distinct nodes and an astronomical expansion)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = MAX_EXPANDED_NODES + 1   # a cycle counts as too large
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        total = min(total, MAX_EXPANDED_NODES + 1)
        sizes[key] = total
        return total

    if size(root) > MAX_EXPANDED_NODES:
        raise DocumentError(f"more than {MAX_EXPANDED_NODES} values once its aliases are expanded")


def load_documents(text: str | bytes) -> list[Any]:
    """The non-empty YAML documents of ``text``.

    Raises:
        DocumentError: above :data:`MAX_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_ALIASES` or
            :data:`MAX_EXPANDED_NODES`; not YAML (naming the line and column).
    """
    if len(text) > MAX_BYTES:
        raise DocumentError(f"larger than {MAX_BYTES} bytes")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    loader = _BoundedLoader(text)
    docs: list[Any] = []
    try:
        while loader.check_data():  # type: ignore[no-untyped-call]
            doc = loader.get_data()
            if doc:
                docs.append(doc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise DocumentError(f"not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise DocumentError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    return docs
