"""CONTRIBUTING.md's examples run against the code: its Python blocks construct what they show
(a knob, a loss row, a backbone entry) and its search-space block loads as a space. And the
structure it relies on holds: the package's imports form no loop, and the backbone registry and
the config schema import no torch."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from tune_clipfh import losses
from tune_clipfh.loss_table import LOSS_TABLE, LossTerm
from tune_clipfh.model.registry import BACKBONES, BackboneSpec, Recipe
from tune_clipfh.schema import knob
from tune_clipfh.tune.space import load_space

REPO = Path(__file__).resolve().parents[1]
CONTRIBUTING = REPO / "CONTRIBUTING.md"
PACKAGE = REPO / "tune_clipfh"


def blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of one ``## section`` of CONTRIBUTING.md, dedented."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"CONTRIBUTING.md has no section {section!r}"
    found = re.findall(rf"^```{language}\n(.*?)^```", match.group(1), re.M | re.S)
    assert found, f"section {section!r} has no {language} block"
    return [textwrap.dedent(block) for block in found]


def table_entry(source: str, namespace: dict) -> object:
    """An entry as the docs write it inside a table: one expression and a trailing comma."""
    return eval(source.strip().removesuffix(","), namespace)  # our own docs, not user input


def test_the_knob_example_declares_schema_fields():
    (source,) = blocks("Add a knob", "python")
    body = "@dataclass\nclass Example:\n" + textwrap.indent(source, "    ")
    namespace = {"dataclass": dataclasses.dataclass, "knob": knob, "Literal": Literal}
    exec(body, namespace)  # our own docs, not user input
    fields = {f.name: f for f in dataclasses.fields(namespace["Example"])}
    assert set(fields) == {"weight_foo", "foo_mode"}
    assert fields["weight_foo"].metadata["group"] == "loss"
    assert (fields["weight_foo"].metadata["low"], fields["weight_foo"].metadata["high"]) == (0, 100)


def test_the_search_example_loads_as_a_space(tmp_path):
    (source,) = blocks("Search a knob", "yaml")
    path = tmp_path / "space.yaml"
    path.write_text("base:\n  loss_use_supcon: true\nparameters:\n"
                    + textwrap.indent(source, "  "), encoding="utf-8")
    space = load_space(path)
    by_name = {parameter.name: parameter for parameter in space.parameters}
    assert by_name["center_loss_weight"].when == {"loss_use_center": [True]}
    assert by_name["prompt_template_list"].named


def test_the_loss_examples_construct_rows_and_the_stateful_one_is_the_tables():
    plain, stateful = blocks("Add a loss", "python")
    namespace = {"LossTerm": LossTerm, "losses": losses}
    row = table_entry(plain, namespace)
    assert isinstance(row, LossTerm) and row.column == "loss_foo" and row.state is None
    center = table_entry(stateful, namespace)
    table = next(term for term in LOSS_TABLE if term.name == "center")
    # every field but the function (a lambda of its own) is the table's
    assert dataclasses.replace(center, function=table.function) == table


def test_the_backbone_example_is_the_registry_entry():
    (source,) = blocks("Add a backbone", "python")
    spec = table_entry(source, {"BackboneSpec": BackboneSpec, "Recipe": Recipe})
    assert spec == BACKBONES[spec.key]


def test_a_backbone_entry_needs_a_valid_tower_and_miniature_finding():
    with pytest.raises(ValueError, match="tower 'cnn' is not valid"):
        dataclasses.replace(BACKBONES["rn50"], tower="cnn")
    with pytest.raises(ValueError, match="miniature 'good' is not valid"):
        dataclasses.replace(BACKBONES["rn50"], miniature="good")


def package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth: inside functions too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                imported |= {base} | {f"{base}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_the_package_imports_form_no_loop():
    graph, done, path = package_imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            loop = path[path.index(module):] + [module]
            pytest.fail(f"import loop: {' -> '.join(loop)}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_registry_and_the_config_import_no_torch():
    code = ("import sys, tune_clipfh.model.registry, tune_clipfh.config, tune_clipfh.cli; "
            "print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"
