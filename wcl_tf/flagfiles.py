"""Flagfiles and the configs that ship in the package (wcl_tf/configs/NAME.flags).

`expand_args` turns a command line with --flagfile=PATH and --config=NAME into the plain
--name=value list they stand for, before absl parses it. It differs from absl's own
flagfile reading in one way: a --flagfile= line inside a flagfile is resolved relative to
the folder of the flagfile that names it (absl resolves it relative to the working
directory), so the shipped configs and a user's own flagfiles work from any directory.
--flagfile= on the command line is relative to the working directory, as in absl.
Lines are read as absl reads them: blank lines and lines starting with '#' or '//' are
skipped, every other line is one argument, stripped.

This module reads files only, never flags (wcl_tf.train and the tools read them).
"""

import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIG_SUFFIX = ".flags"


class FlagfileError(ValueError):
    """A --flagfile or --config that cannot be read: reported in one line."""


def available_configs():
    """Names of the shipped configs, e.g. ['cifar10_r18', 'demo', 'r50', ...]."""
    try:
        names = os.listdir(CONFIG_DIR)
    except OSError:
        return []
    return sorted(n[:-len(CONFIG_SUFFIX)] for n in names if n.endswith(CONFIG_SUFFIX))


def config_path(name):
    """Path of the shipped config NAME (wcl_tf/configs/NAME.flags)."""
    names = available_configs()
    if name not in names:
        hint = ("; to read a file, pass --flagfile=PATH"
                if os.sep in name or "/" in name or name.endswith(CONFIG_SUFFIX) else "")
        raise FlagfileError(
            f"unknown --config={name!r}: the shipped configs are "
            f"{', '.join(names) or '(none found in ' + CONFIG_DIR + ')'}{hint}.")
    return os.path.join(CONFIG_DIR, name + CONFIG_SUFFIX)


def _directive(arg, name):
    """(matched, value or None) for --name=value, -name=value, --name and -name."""
    for prefix in ("--", "-"):
        if arg == prefix + name:
            return True, None
        if arg.startswith(prefix + name + "="):
            return True, arg[len(prefix + name) + 1:].strip()
    return False, None


def _read(path, named_by, stack):
    """The arguments of the flagfile at `path`, nested flagfiles expanded in place."""
    real = os.path.realpath(path)
    if real in stack:
        raise FlagfileError(f"flagfile {path!r} includes itself (through "
                            f"{' -> '.join(stack + [real])}).")
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as err:
        where = f" named in {named_by}" if named_by else ""
        rule = (" (a nested --flagfile= is relative to the folder of the flagfile that "
                "names it)" if named_by else "")
        raise FlagfileError(f"cannot read flagfile {path!r}{where}: "
                            f"{err.strerror or err}{rule}.") from None
    args = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        args.extend(_expand(line, [], path, os.path.dirname(path), stack + [real]))
    return args


def _expand(arg, rest, named_by, base_dir, stack):
    """The arguments `arg` stands for; takes a separate value from `rest` when needed."""
    for name in ("flagfile", "config"):
        matched, value = _directive(arg, name)
        if not matched:
            continue
        if value is None:
            if not rest:
                raise FlagfileError(f"--{name} needs a value"
                                    + (f" (in {named_by})" if named_by else "") + ".")
            value = rest.pop(0).strip()
        if not value:
            raise FlagfileError(f"--{name} needs a value"
                                + (f" (in {named_by})" if named_by else "") + ".")
        if name == "config":
            path = config_path(value)
        else:
            path = os.path.expanduser(value)
            if base_dir and not os.path.isabs(path):
                path = os.path.join(base_dir, path)
        return _read(path, named_by, stack)
    return [arg]


def expand_args(args):
    """`args` (no program name) with every --flagfile=PATH and --config=NAME replaced by the
    lines of the file, in place: later arguments override them. Stops at '--'."""
    rest, out = list(args), []
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            out.append(arg)
            out.extend(rest)
            break
        out.extend(_expand(arg, rest, None, None, []))
    return out
