"""The public API is documented the way the field does (numpydoc sections), and every command's help shows
each option's default and unit; no ``--help`` imports TensorFlow."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import opdcells
from opdcells.cli import build_parser

REPO = Path(__file__).resolve().parents[1]

#: A numpydoc section header: the name, then a line of dashes.
SECTION = re.compile(r"^[ \t]*(Parameters|Other Parameters|Attributes|Returns|Yields|Raises)[ \t]*\n"
                     r"[ \t]*-{3,}[ \t]*$", re.M)

#: Modules whose public functions and classes predate the rule, with how many of them still miss a section.
#: A count may only go down: document one and lower its number here (the test says when).
UNDOCUMENTED: dict[str, int] = {}

#: Option name patterns of physical quantities -> the units one of which the option name, metavar or help
#: must name (a dimensionless option -- a fraction, a count, an index -- matches none of them).
QUANTITY_UNITS = {
    r"wavelength": ("nm",),
    r"pixel_size": ("um", "µm"),
    r"diameter": ("um", "µm"),
    r"dry_mass": ("pg",),
    r"norm_scale": ("nm",),
    r"(^|_)(input|out)_size$": ("px",),
    r"timeout|minutes|seconds": ("s", "seconds", "minutes"),
}


def _public_objects():
    """(qualified name, object) of every function and class a module of the package defines publicly."""
    names = [info.name for info in pkgutil.walk_packages(opdcells.__path__, "opdcells.")
             if not info.name.endswith("__main__")]
    for module in [opdcells, *map(importlib.import_module, names)]:
        for name, obj in vars(module).items():
            if (not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == module.__name__):
                yield module.__name__, f"{module.__name__}.{name}", obj


def _parameters(fn) -> list[str]:
    try:
        return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        return []


def _own_docstring(obj) -> str | None:
    doc = obj.__doc__
    if dataclasses.is_dataclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None   # the signature dataclasses write when there is no docstring
    return inspect.cleandoc(doc) if doc else None


def docstring_problems(qualname: str, obj) -> list[str]:
    """What a public function or class's docstring misses: the docstring itself; Parameters (a class:
    Parameters or Attributes, in its docstring or its ``__init__``'s) when it takes parameters; Returns
    (or Yields) when its return annotation is not None."""
    doc = _own_docstring(obj)
    if not doc:
        return [f"{qualname}: no docstring"]
    found = set(SECTION.findall(doc))
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return []
        init = obj.__dict__.get("__init__")
        fields = [f.name for f in dataclasses.fields(obj) if f.init] if dataclasses.is_dataclass(obj) else []
        params = _parameters(init) if init else fields
        init_sections = set(SECTION.findall(inspect.getdoc(init) or "")) if init else set()
        if params and not (found | init_sections) & {"Parameters", "Attributes"}:
            return [f"{qualname}: takes {', '.join(params)} but has no Parameters/Attributes section"]
        return []
    out = []
    params = _parameters(obj)
    if params and "Parameters" not in found:
        out.append(f"{qualname}: takes {', '.join(params)} but has no Parameters section")
    returns = inspect.signature(obj).return_annotation
    if returns not in (inspect.Signature.empty, None, "None") and not found & {"Returns", "Yields"}:
        out.append(f"{qualname}: returns {returns} but has no Returns section")
    return out


def test_docstring_checker_finds_missing_sections():
    def documented(maps, pixel_size_um: float) -> float:
        """Mean OPD.

        Parameters
        ----------
        maps : ndarray (N, S, S), nm
        pixel_size_um : float, um

        Returns
        -------
        float
        """

    def bare(maps) -> float:
        """Mean OPD."""

    assert docstring_problems("documented", documented) == []
    assert docstring_problems("bare", bare) == ["bare: takes maps but has no Parameters section",
                                                "bare: returns float but has no Returns section"]


def test_public_api_has_numpydoc_sections():
    by_module: dict[str, list[str]] = {}
    for module, qualname, obj in _public_objects():
        by_module.setdefault(module, []).extend(docstring_problems(qualname, obj))
    errors = []
    for module, problems in sorted(by_module.items()):
        allowed = UNDOCUMENTED.get(module, 0)
        if len(problems) > allowed:
            errors += [f"{module}: {len(problems)} > {allowed} allowed"] * bool(allowed) + problems
        elif len(problems) < allowed:
            errors.append(f"{module}: {len(problems)} left, lower UNDOCUMENTED[{module!r}] to that")
    errors += [f"{module}: no such module, drop it from UNDOCUMENTED" for module in UNDOCUMENTED
               if module not in by_module]
    assert not errors, "\n".join(errors)


def _commands(parser: argparse.ArgumentParser):
    """(command name, parser) of ``python -m opdcells`` itself and of every command."""
    yield "", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _options():
    for command, parser in _commands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                shown = formatter._expand_help(action) if action.help else ""
                yield command, action, shown


def test_every_option_shows_its_default():
    missing = []
    for command, action, shown in _options():
        default = action.default
        if default is None or default is False or default in ([], argparse.SUPPRESS):
            continue
        value = "/".join(map(str, default)) if isinstance(default, tuple) else str(default)
        if not re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", shown):
            missing.append(f"{command} {action.option_strings[-1]}: default {default!r} not in {shown!r}")
    assert not missing, "\n".join(missing)


def test_options_of_physical_quantities_name_their_unit():
    missing = []
    for command, action, shown in _options():
        for pattern, units in QUANTITY_UNITS.items():
            if re.search(pattern, action.dest):
                text = " ".join([*action.option_strings, str(action.metavar or ""), shown]).lower()
                if not any(re.search(rf"(?<![a-zµ]){re.escape(unit)}(?![a-z])", text) for unit in units):
                    missing.append(f"{command} {action.option_strings[-1]}: no unit ({' or '.join(units)})")
    assert not missing, "\n".join(missing)


def test_help_never_imports_tensorflow():
    code = ("import contextlib, io, sys\nfrom opdcells.cli import main\n"
            "for argv in ([], ['--help'], *([c, '--help'] for c in sys.argv[1:])):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        main(argv)\n"
            "assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules), 'TensorFlow'\n")
    commands = [name for name, _ in _commands(build_parser()) if name]
    assert "pretrain" in commands
    subprocess.run([sys.executable, "-c", code, *commands], cwd=REPO, check=True, timeout=120)
