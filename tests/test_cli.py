"""``mixsel --version`` and ``mixsel methods``: what they print, read from the declared attributes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixsel
from mixsel import available_reweighters, available_selectors, registry
from mixsel.cli import COST_CLASSES, main, method_rows, selector_cost, version_line

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_one_line_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == version_line() + "\n"
    assert out.startswith(f"mixsel {mixsel.__version__} (torch {torch.__version__}, transformers ")


def test_version_through_the_entry_point():
    done = subprocess.run([sys.executable, "-m", "mixsel", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"mixsel {mixsel.__version__} (torch ")


def test_version_matches_pyproject():
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert found is not None and found.group(1) == mixsel.__version__


def _table(out: str) -> dict[str, list[list[str]]]:
    """The method lines of ``mixsel methods`` (header to the first blank line), keyed by name."""
    lines = out.split("\n\n", 1)[0].splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "cost"]
    table: dict[str, list[list[str]]] = {}
    for line in lines[1:]:
        cells = line.split(maxsplit=3)
        table.setdefault(cells[0], []).append(cells)
    return table


def test_methods_lists_every_registered_name_once_with_a_cost_class(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    table = _table(out)
    kinds = {name: "selector" for name in available_selectors()}
    kinds.update({name: "reweighter" for name in available_reweighters()})
    assert set(table) == set(kinds)
    for name, kind in kinds.items():
        assert len(table[name]) == 1, name
        _, listed_kind, cost, needs = table[name][0]
        assert listed_kind == kind, name
        assert cost in COST_CLASSES and cost != "unknown", name
        assert f"  {cost} " in out.split("\n\n", 1)[1], f"cost class {cost!r} is not explained"
        if kind == "reweighter":
            assert re.match(r"mode (sampling|loss|both); ", needs), needs


def test_methods_cost_and_needs_follow_the_declarations():
    rows = {name: (kind, cost, needs) for name, kind, cost, needs in method_rows()}
    assert rows["random"][1:] == ("none", "nothing")
    assert rows["big_loss"][1:] == ("forward", "loss")
    assert rows["hidden_fl"][1] == "forward"
    assert rows["craig"][1:] == ("gradients", "gram")
    assert rows["partitionsel"][1] == "gradients" and "validation anchors" in rows["partitionsel"][2]
    assert rows["colm"][1] == "zeroth-order" and "source sizes" in rows["colm"][2]  # CoLM's default: SPSA
    assert rows["doremi"][1:] == ("forward", "mode loss; reference-model losses (needs_reference)")
    assert rows["dograph"][1:] == ("gradients", "mode sampling; domain gradients + validation gradients (needs_grad)")
    assert rows["doge"][1] == "gradients" and "needs_grad" in rows["doge"][2]
    assert rows["static"][1:] == ("none", "mode sampling; domain loss stats only")  # needs weights=: class attrs


def test_methods_reads_a_newly_registered_method(monkeypatch):
    class Odd:
        requires = frozenset({"zo_grads", "hidden"})

    class Bogus:
        requires = frozenset({"bogus"})

        def __init__(self, needed: int) -> None:  # no defaults: the listing reads the class
            self.needed = needed

    class Ref:
        default_mode = "both"
        needs_reference = True
        needs_grad = False

        def __init__(self, domains: list[str], weights: list[float]) -> None:
            self.mode = "loss"

    registry.available_selectors()  # load the built-in methods before patching the tables
    registry.available_reweighters()
    monkeypatch.setitem(registry._SELECTORS, "zz_odd", Odd)
    monkeypatch.setitem(registry._SELECTORS, "zz_bogus", Bogus)

    class Grad:
        default_mode = "loss"
        needs_reference = False
        needs_grad = True

        def __init__(self, domains: list[str]) -> None:
            self.mode = "sampling"

        @property
        def needs_val_grad(self) -> bool:  # the optional attribute: this one never reads val_grad
            return False

    class GradNeedsOptions(Grad):
        def __init__(self, domains: list[str], target: str) -> None:  # read off the class: property -> needs_grad
            self.mode = "both"

    monkeypatch.setitem(registry._REWEIGHTERS, "zz_ref", Ref)
    monkeypatch.setitem(registry._REWEIGHTERS, "zz_grad", Grad)
    monkeypatch.setitem(registry._REWEIGHTERS, "zz_grad_options", GradNeedsOptions)
    rows = {name: (kind, cost, needs) for name, kind, cost, needs in method_rows()}
    assert rows["zz_odd"] == ("selector", "zeroth-order", "hidden, zo_grads")
    assert rows["zz_bogus"] == ("selector", "unknown", "bogus")
    assert rows["zz_ref"] == ("reweighter", "forward", "mode both; reference-model losses (needs_reference)")
    assert rows["zz_grad"] == ("reweighter", "gradients", "mode sampling; domain gradients (needs_grad)")
    assert rows["zz_grad_options"][2] == "mode loss; domain gradients + validation gradients (needs_grad)"


@pytest.mark.parametrize(
    ("requires", "cost"),
    [
        (set(), "none"),
        ({"loss", "hidden", "completion_length"}, "forward"),
        ({"loss", "grad_norm"}, "gradients"),
        ({"val_gram"}, "gradients"),
        ({"zo_grads", "hidden"}, "zeroth-order"),
        ({"grads", "zo_grads"}, "zeroth-order"),
        ({"loss", "typo"}, "unknown"),
    ],
)
def test_selector_cost_classes(requires, cost):
    assert selector_cost(requires) == cost
