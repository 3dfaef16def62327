"""The student trains on the PUBLIC API of ``transformers.Trainer`` only.

No file of ``src/gvbsm_hf`` may read or write a private attribute of the Trainer, its state,
control or callback handler (``self._tr_loss``, ``trainer._globalstep_last_logged``, ...) nor
override a private Trainer method (``_save_checkpoint``, ``_maybe_log_save_evaluate``, ...): such
code breaks silently when ``transformers`` changes its internals.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import transformers.trainer as hf_trainer
import transformers.trainer_callback as hf_callback
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler

import gvbsm_hf

SRC = Path(gvbsm_hf.__file__).parent
BASES = {"Trainer", "TrainerCallback", "ExportableState", "CallbackHandler"}
"""Classes of ``transformers`` whose private members are off limits (and whose subclasses are checked)."""
HOLDERS = {"trainer", "state", "control", "callback_handler"}
"""Names under which code reaches a Trainer or its state from outside (``trainer._x``, ``state._x``, ``self.state._x``)."""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def trainer_private_names() -> set[str]:
    """Private members of Trainer, TrainerState, TrainerControl, TrainerCallback and CallbackHandler: their
    methods and class attributes, and every ``self._x`` the transformers sources set or read."""
    names = {n for cls in (Trainer, TrainerState, TrainerControl, TrainerCallback, CallbackHandler)
             for n in dir(cls) if _is_private(n)}
    for module in (hf_trainer, hf_callback):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if _is_private(node.attr):
                    names.add(node.attr)
    return names


TRAINER_PRIVATE = trainer_private_names()


def _base_names(cls: ast.ClassDef) -> set[str]:
    out = set()
    for b in cls.bases:
        if isinstance(b, ast.Name):
            out.add(b.id)
        elif isinstance(b, ast.Attribute):
            out.add(b.attr)
    return out


def _own_members(cls: ast.ClassDef) -> set[str]:
    """Names a class defines itself: methods, nested classes, class attributes and ``self.<name> = ...``."""
    own = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            own.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            own.add(node.attr)
    return own


def _holder(node: ast.expr) -> str | None:
    """``trainer`` / ``state`` / ... for ``trainer._x``, ``self.state._x``, ``self.trainer._x``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def private_trainer_accesses(source: str, filename: str = "<src>", known_subclasses: set[str] = frozenset()) -> list[str]:
    """Every place in ``source`` that reads, writes or overrides a private Trainer member.

    * any ``<expr>._x`` (or ``getattr/setattr/hasattr(<expr>, "_x")``) with ``_x`` a known private
      member of the Trainer, its state, control or callback handler;
    * any ``trainer._x`` / ``state._x`` / ``control._x`` (private, whatever its name);
    * in a subclass of Trainer / TrainerCallback (``known_subclasses``: subclasses defined elsewhere in
      the package): ``self._x`` that the class does not define itself, and methods overriding a
      private Trainer method.
    """
    tree = ast.parse(source)
    found = []
    checked = BASES | set(known_subclasses)
    # ``self._x`` of a class that is no Trainer / callback and defines ``_x`` itself is its own business
    own_use = {id(node) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) and not _base_names(cls) & checked
               for node in ast.walk(cls) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id == "self" and node.attr in _own_members(cls)}

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and id(node) not in own_use:
            if node.attr in TRAINER_PRIVATE:
                hit(node, f"private Trainer member .{node.attr}")
            elif _holder(node.value) in HOLDERS:
                hit(node, f"private {_holder(node.value)}.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value in TRAINER_PRIVATE:
                hit(node, f"{node.func.id}(..., {name.value!r})")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if not _base_names(cls) & checked:
            continue
        own = _own_members(cls)
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in TRAINER_PRIVATE:
                hit(node, f"{cls.name} overrides the private Trainer method {node.name}")
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and _is_private(node.attr) and node.attr not in own and node.attr not in TRAINER_PRIVATE:
                hit(node, f"{cls.name} uses self.{node.attr}, which it does not define (inherited private)")
    return found


def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(SRC.parent)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def _package_subclasses(sources: dict[str, str]) -> set[str]:
    """Names of the package's own Trainer / TrainerCallback subclasses (so their subclasses are checked too)."""
    names, grew = set(), True
    trees = [ast.parse(s) for s in sources.values()]
    while grew:
        grew = False
        for tree in trees:
            for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
                if cls.name not in names and _base_names(cls) & (BASES | names):
                    names.add(cls.name)
                    grew = True
    return names


def test_the_known_private_names_are_found():
    assert {"_tr_loss", "_total_loss_scalar", "_globalstep_last_logged", "_save_checkpoint",
            "_maybe_log_save_evaluate", "_created_lr_scheduler", "_prepare_inputs", "_get_output_dir",
            "_load_callback_state"} <= TRAINER_PRIVATE


def test_no_file_of_the_package_touches_private_trainer_members():
    sources = _package_sources()
    subclasses = _package_subclasses(sources)
    assert {"GVBSMTrainer", "StudentEMACallback", "ExactResumeCallback"} <= subclasses
    found = [f for name, src in sources.items() for f in private_trainer_accesses(src, name, subclasses)]
    assert found == [], "private Trainer internals used:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    """
    class T(Trainer):
        def f(self):
            return self._tr_loss
    """,
    """
    class T(Trainer):
        def f(self):
            self._globalstep_last_logged = self.state.global_step
    """,
    """
    class T(Trainer):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
    """,
    """
    class C(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.trainer._total_loss_scalar = 0.0
    """,
    """
    def restore(trainer):
        trainer._tr_loss.fill_(0.0)
    """,
    """
    def restore(trainer):
        return hasattr(trainer, "_tr_loss")
    """,
    """
    class C(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            return state._some_private_field
    """,
    """
    class S(GVBSMTrainer):
        def f(self):
            return self._a_private_attribute_of_a_future_transformers
    """,
])
def test_the_check_catches_private_trainer_access(snippet):
    assert private_trainer_accesses(textwrap.dedent(snippet), known_subclasses={"GVBSMTrainer"})


def test_the_check_allows_other_classes_their_own_private_members():
    ok = """
    class Stage:
        def run(self):
            return self._evaluate()

        def _evaluate(self):
            return 1
    """
    assert private_trainer_accesses(textwrap.dedent(ok)) == []


def test_the_check_allows_a_subclass_its_own_private_members():
    ok = """
    class T(Trainer):
        limit = 3

        def __init__(self):
            self._mine = 1

        def _helper(self):
            return self._mine + self.state.global_step
    """
    assert private_trainer_accesses(textwrap.dedent(ok)) == []
