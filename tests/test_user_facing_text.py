"""Nothing a user reads names a file outside the repository or a path of the machine it
was written on: README, docs, the shipped configs, the package's sources (docstrings,
comments, messages, flag help) and `python -m wcl_tf.train --helpfull`. The method they
cite lives in docs/method.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A pointer to the engineers' notes outside the repository, or an absolute path of the
# workspace the project was built in.
FORBIDDEN = re.compile(r"\.\./shared|WCL_SPEC|/work/")


def _offences(name, text):
    """'name:line: text' for every line of text that matches FORBIDDEN."""
    return [f"{name}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), start=1)
            if FORBIDDEN.search(line)]


def _user_facing_files():
    patterns = ["README.md", "setup.py", "docs/**/*.md", "wcl_tf/configs/*.flags",
                "wcl_tf/**/*.py", "tools/*.py"]
    return sorted({path for pattern in patterns for path in ROOT.glob(pattern)})


def test_the_checker_names_file_and_line():
    text = "fine\nsee ../shared/notes.md\nWCL_SPEC section 2\nin /work/x/y\nalso fine"
    assert _offences("a.md", text) == [
        "a.md:2: see ../shared/notes.md", "a.md:3: WCL_SPEC section 2",
        "a.md:4: in /work/x/y"]


def test_readme_docs_configs_and_sources_name_no_outside_file():
    files = _user_facing_files()
    names = {path.relative_to(ROOT).as_posix() for path in files}
    # The globs found what they are meant to check (an empty list would pass vacuously).
    assert {"README.md", "docs/method.md", "wcl_tf/configs/r50.flags",
            "wcl_tf/losses.py", "wcl_tf/train.py"} <= names
    offences = [o for path in files
                for o in _offences(path.relative_to(ROOT).as_posix(),
                                   path.read_text(encoding="utf-8"))]
    assert not offences, (
        "user-facing text names a file outside the repository or a workspace path; cite "
        "docs/method.md (by section) instead:\n" + "\n".join(offences))


def test_train_helpfull_names_no_outside_file(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "wcl_tf.train", "--helpfull"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    text = result.stdout + result.stderr
    assert "--gather_grad" in text and "--knn_crops" in text, text[-2000:]
    # absl heads the flags of the __main__ module with sys.argv[0], which for `python -m`
    # is where wcl_tf/train.py is installed on the reader's own machine: not a reference
    # to anything outside the package.
    text = re.sub(r"(?m)^\S*wcl_tf[/\\]train\.py:$", "wcl_tf.train:", text)
    offences = _offences("python -m wcl_tf.train --helpfull", text)
    assert not offences, "\n".join(offences)
