"""Runs a tool's absl main the same way from every entry point."""

import os
import sys

from absl import app, flags

TOOLS_PACKAGE = "wcl_tf.tools."


def run(main, module_name):
    """app.run(main), with --help showing the tool's docstring and flags.

    absl's --help shows the docstring and the flags of the program's __main__ module. Run as
    `python -m wcl_tf.tools.NAME` that is the tool itself; run through tools/NAME.py or a
    console script it is a few-line launcher, so the tool's docstring and the flags defined
    by wcl_tf.tools modules are handed to it.
    """
    module = sys.modules[module_name]
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module is not module:
        main_module.__doc__ = module.__doc__
    for name, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if name.startswith(TOOLS_PACKAGE):
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parsing after expanding --config=NAME (a packaged config such as
    r50_linear) and nested --flagfile lines, as wcl_tf.train does."""
    from wcl_tf import flagfiles  # pylint: disable=import-outside-toplevel

    try:
        argv = argv[:1] + flagfiles.expand_args(argv[1:])
    except flagfiles.FlagfileError as err:
        print(f"{os.path.basename(argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)
