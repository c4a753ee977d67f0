"""Every public callable has a docstring, and one that raises on purpose says so.

"Public" is what a reader of the API reference sees: every module under ``virtq`` whose
dotted name has no part starting with an underscore; in it, the names of its ``__all__``
(or, in a module without one, every name it defines that does not start with an
underscore); of a class, every method, property, class- and staticmethod its body defines
whose name does not start with an underscore.

A callable whose own body contains a ``raise SomeError`` (not a bare re-raise, not one in
a nested function) must mention it in its docstring ("raises ...", "Raises ...").
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import virtq


def public_modules() -> list[str]:
    names = ["virtq"]
    for info in pkgutil.walk_packages(virtq.__path__, "virtq."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


def public_names(module: Any) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return list(exported)
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__]


def members(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            if attr.fget is not None:
                yield name, attr.fget
        elif isinstance(attr, classmethod | staticmethod):
            yield name, attr.__func__
        elif inspect.isfunction(attr):
            yield name, attr


def is_function(obj: Any) -> bool:
    """A plain function, or one wrapped by a decorator (``functools.cache``)."""
    return callable(obj) and inspect.isfunction(inspect.unwrap(obj))


def public_callables() -> dict[str, Callable[..., Any]]:
    """``module.qualname`` -> the function (or class) for every public callable."""
    found: dict[str, Callable[..., Any]] = {}
    for modname in public_modules():
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or is_function(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("virtq"):
                continue  # a re-exported typing helper or stdlib class
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
            if inspect.isclass(obj):
                for mname, fn in members(obj):
                    found[f"{obj.__module__}.{obj.__qualname__}.{mname}"] = fn
    return found


def raises_on_purpose(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s own body (not a nested function's) has ``raise X``."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    except (OSError, TypeError):
        return False
    tree = ast.parse(source)
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        return False

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                          | ast.ClassDef):
                continue
            yield child
            yield from walk(child)

    return any(isinstance(node, ast.Raise) and node.exc is not None
               for node in walk(tree.body[0]))


CALLABLES = public_callables()


def test_the_walk_finds_the_public_api():
    # A floor, not a count: the walk must reach into subpackages and classes.
    assert len(CALLABLES) > 400
    assert "virtq.queue.split.SplitQueue.add" in CALLABLES
    assert "virtq.devices.blk.BlkDevice.read" in CALLABLES
    assert "virtq.layout.split.SplitLayout.compute" in CALLABLES


def test_every_public_callable_has_a_docstring():
    missing = sorted(name for name, fn in CALLABLES.items()
                     if not (fn.__doc__ or "").strip())
    assert not missing, f"{len(missing)} public callables without a docstring:\n" + \
        "\n".join(missing)


def test_a_callable_that_raises_says_so():
    silent = sorted(name for name, fn in CALLABLES.items()
                    if is_function(fn) and raises_on_purpose(fn)
                    and "raise" not in (fn.__doc__ or "").lower())
    assert not silent, f"{len(silent)} public callables raise without saying so:\n" + \
        "\n".join(silent)


def test_the_raise_check_can_fail():
    def quiet(x: int) -> int:
        """Double it."""
        if x < 0:
            raise ValueError(x)
        return 2 * x

    def nested() -> Callable[[], None]:
        """Make a function."""
        def inner() -> None:
            raise ValueError
        return inner

    assert raises_on_purpose(quiet)
    assert not raises_on_purpose(nested)
