"""The documents and the code agree: every reference from the code to a document points inside this repository, to
a section that exists; the README's "Where to read what" table names functions that exist; every relative link in
README.md and docs/*.md resolves; no command is abbreviated with `...`; every flag a printed command passes is one
its script takes; and the tiny commands (the fenced blocks marked `<!-- tiny -->`, and the tiny launch lines of the
scripts' docstrings) run as printed, in order, in a copy of the working tree."""
import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/tools/*.py") + glob.glob(f"{ROOT}/data/shapes/*.py") + glob.glob(f"{ROOT}/tests/*.py"))
DOCS = [f"{ROOT}/README.md"] + sorted(glob.glob(f"{ROOT}/docs/*.md"))
SCRIPTS = sorted(glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/tools/*.py") + glob.glob(f"{ROOT}/data/shapes/*.py"))
REF = re.compile(r"([\w./-]+\.md)((?:,? ?§\d+)*)")
TINY = "<!-- tiny -->"                  # the line before a fenced bash block that tests/test_docs.py runs
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# the scripts whose docstrings' tiny launch lines (`python ...` naming data/shapes) must run as printed
TINY_DOCSTRINGS = ["stage1_coldstart.py", "stage2_grpo_und.py", "stage3_grpo_gen.py", "eval_unified.py", "sample.py"]


def rel(path):
    return os.path.relpath(path, ROOT)


def sections(md):
    return {int(n) for n in re.findall(r"^#+ §(\d+)\b", open(md).read(), re.M)}


def test_code_cites_only_documents_and_sections_of_this_repo():
    bad, n_refs = [], 0
    for f in SOURCES + [f"{ROOT}/README.md"]:
        text = open(f).read()
        if f.endswith("test_docs.py"):
            continue
        for ln, line in enumerate(text.splitlines(), 1):
            if re.search(r"\bSPEC\b(?!IAL)", line):
                bad.append(f"{rel(f)}:{ln}: cites SPEC, a document outside the repository")
            for doc, secs in REF.findall(line):
                if not secs and not doc.startswith("docs/"):
                    continue  # an output file such as report.md, not a citation
                path = os.path.join(ROOT, doc)
                if not os.path.isfile(path):
                    bad.append(f"{rel(f)}:{ln}: {doc} does not exist in the repository")
                    continue
                for n in re.findall(r"§(\d+)", secs):
                    n_refs += 1
                    if int(n) not in sections(path):
                        bad.append(f"{rel(f)}:{ln}: {doc} has no section §{n}")
    assert not bad, "\n".join(bad)
    assert n_refs >= 20  # the code does point into the algorithm page


def test_sections_checker_can_fail(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# title\n## §1 one\n### §3 three\n")
    assert sections(str(md)) == {1, 3}
    assert REF.findall("see docs/algorithm.md §4, §5 and x") == [("docs/algorithm.md", " §4, §5")]


def _defined_names():
    names = {}
    for f in glob.glob(f"{ROOT}/*.py"):
        mod = os.path.splitext(os.path.basename(f))[0]
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.setdefault(node.name, set()).add(mod)
    return names


def test_where_to_read_what_names_real_functions():
    readme = open(f"{ROOT}/README.md").read()
    table = readme.split("## Where to read what", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("|") and "---" not in r][1:]
    assert len(rows) >= 10
    names = _defined_names()
    for row in rows:
        for ref in re.findall(r"`(\w+)\.py` `([\w.]+)`", row):
            mod, fn = ref
            assert fn.split(".")[-1] in names and mod in names[fn.split(".")[-1]], f"{mod}.py has no {fn}: {row}"


# ---------------------------------------------------------------------------------------------- the Markdown

def blocks(text):
    """Fenced blocks of a Markdown text -> [(language, body, line number of the fence, marked tiny)]."""
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        out.append((m.group(1).split()[0] if m.group(1).strip() else "", m.group(2),
                    text.count("\n", 0, m.start()) + 1, before == TINY))
    return out


def commands(body):
    """A shell text -> [(the command as printed, its words)]: continuation lines joined, a quoted argument over
    several lines kept whole, comments and here-document bodies left out."""
    out, buf, heredoc = [], "", None
    for line in body.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        buf += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        try:
            words = shlex.split(buf.replace("\\\n", " "), comments=True)
        except ValueError:  # an open quote: the argument goes on on the next line
            continue
        m = re.search(r"<<-?\s*'?(\w+)'?", buf)
        heredoc = m.group(1) if m else None
        if words:
            out.append((buf.strip(), words))
        buf = ""
    return out


def shell_blocks():
    """Every bash block of README.md and docs/*.md -> [(file, line, body, marked tiny)]."""
    out = []
    for md in DOCS:
        for lang, body, ln, tiny in blocks(open(md).read()):
            if lang in ("bash", "sh", "shell"):
                out.append((rel(md), ln, body, tiny))
    return out


def docstring_commands(path):
    """The `python ...` / `torchrun ...` lines of a script's module docstring (a continuation `\\` is joined by
    Python's string escapes, or here in a raw docstring) -> [command as printed]."""
    lines = (ast.get_docstring(ast.parse(open(path).read()), clean=False) or "").splitlines()
    out, i = [], 0
    while i < len(lines):
        c = lines[i].strip()
        while c.endswith("\\") and i + 1 < len(lines):
            i += 1
            c = c[:-1] + " " + lines[i].strip()
        if c.startswith(("python ", "torchrun ")):
            out.append(c)
        i += 1
    return out


def words_of(command):
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return [command]


def test_blocks_and_commands_are_read_as_a_shell_reads_them():
    md = ("text\n" + TINY + "\n```bash\npython a.py --x 1 \\\n    --y 2   # a comment\ncat > f.py <<'EOF'\n"
          "print(1) ...\nEOF\npython -c '\nimport os\n'\n```\n\n```python\nx = 1\n```\n")
    (lang, body, ln, tiny), (lang2, _, _, tiny2) = blocks(md)
    assert (lang, ln, tiny, lang2, tiny2) == ("bash", 3, True, "python", False)
    cmds = commands(body)
    assert [w for _, w in cmds] == [["python", "a.py", "--x", "1", "--y", "2"], ["cat", ">", "f.py", "<<EOF"],
                                    ["python", "-c", "\nimport os\n"]]
    assert not any("..." in c for c, _ in cmds)  # the here-document's body is not a command


def test_no_command_is_abbreviated():
    """No command in a bash block of the documents, or in a script's docstring, ends in or contains `...`: each
    runs as printed."""
    bad = []
    for md, ln, body, _ in shell_blocks():
        bad += [f"{md}:{ln}: {c}" for c, _ in commands(body) if "..." in c]
    for f in SCRIPTS:
        bad += [f"{rel(f)} (docstring): {c}" for c in docstring_commands(f) if "..." in c]
    assert not bad, "abbreviated commands:\n" + "\n".join(bad)
    assert len(shell_blocks()) >= 10


def test_abbreviation_check_can_fail():
    assert ["python a.py ..."] == [c for c, _ in commands("python a.py ...\npython b.py\n") if "..." in c]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md):
    text = FENCE.sub("", open(md).read())
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(md):
    """Relative links of a Markdown file (outside code blocks) whose file or heading does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", open(md).read())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
        if not os.path.exists(full):
            bad.append(f"{rel(md)}: ({target}): no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{rel(md)}: ({target}): no such heading in {rel(full)}")
    return bad


def test_every_relative_link_resolves():
    bad = sum((broken_links(md) for md in DOCS), [])
    assert not bad, "\n".join(bad)
    assert sum(len(LINK.findall(open(md).read())) for md in DOCS) >= 15


def test_link_check_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "b.md").write_text("# The B: part\n")
    md = tmp_path / "a.md"
    md.write_text("[ok](b.md) [ok](b.md#the-b-part) [web](https://x.org/y.md) [gone](c.md) [bad](b.md#nope)\n"
                  "```\n[in code](d.md)\n```\n")
    assert broken_links(str(md)) == ["a.md: (c.md): no such file", "a.md: (b.md#nope): no such heading in b.md"]


def test_readme_is_a_front_door():
    lines = open(f"{ROOT}/README.md").read().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    heading = next(i for i, ln in enumerate(lines, 1) if ln.startswith("## GRPO, step by step"))
    assert heading <= 150, f"the GRPO walkthrough starts at line {heading}"


# ---------------------------------------------------------------------------------------------- the commands

def invocation(words):
    """A command's words -> (the repository script it runs, its arguments), or None for anything else."""
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    if words[0] in ("torchrun", "srun"):
        i = words.index("torchrun") + 1 if "torchrun" in words else 1
        while i < len(words) and not words[i].endswith(".py"):
            i += 1 + (i + 1 < len(words) and words[i].startswith("--") and "=" not in words[i]
                      and not words[i + 1].startswith("--") and not words[i + 1].endswith(".py"))
        return (words[i], words[i + 1:]) if i < len(words) else None
    return None


def test_invocation_reads_torchrun_lines():
    w = shlex.split("torchrun --nnodes 2 --nproc_per_node=8 --rdzv_endpoint $HOST:29500 stage1_coldstart.py --x 1")
    assert invocation(w) == ("stage1_coldstart.py", ["--x", "1"])
    assert invocation(["python", "-c", "print(1)"]) is None


# Runs each script's --help in one interpreter (torch and transformers imported once, not once a script).
HELP = """
import contextlib, io, json, os, runpy, sys
out = {}
for s in sys.argv[1:]:
    buf, code = io.StringIO(), None
    sys.argv, sys.path[0] = [s, "--help"], os.path.dirname(os.path.abspath(s))
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(s, run_name="__main__")
    except SystemExit as e:
        code = e.code
    out[s] = [code, buf.getvalue()]
print("HELP:" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def script_flags():
    """script -> the option strings its --help lists."""
    wanted = sorted({inv[0] for _, _, body, _ in shell_blocks() for _, w in commands(body) if (inv := invocation(w))}
                    | {inv[0] for f in SCRIPTS for c in docstring_commands(f) if (inv := invocation(words_of(c)))})
    wanted = [s for s in wanted if os.path.isfile(os.path.join(ROOT, s))]
    p = subprocess.run([sys.executable, "-c", HELP, *wanted], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900)
    assert p.returncode == 0 and "HELP:" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    helps = json.loads(p.stdout.rsplit("HELP:", 1)[1])
    bad = {s: text[-500:] for s, (code, text) in helps.items() if code not in (0, None) or "--help" not in text}
    assert not bad, f"--help failed: {bad}"
    return {s: help_options(text) for s, (_, text) in helps.items()}


def help_options(text):
    """The option strings of an argparse --help: its option column (indented by at most 4 spaces, up to the two
    spaces before the description), not the flags a description or an epilog mentions."""
    cols = [m.group(1) for m in (re.match(r" {1,4}(-.*?)(?:  |$)", ln) for ln in text.splitlines()) if m]
    return {f for c in cols for f in re.findall(r"--[\w-]+", c)}


def test_help_options_are_the_option_column():
    text = ("usage: x.py [-h] [--steps STEPS]\n\noptions:\n  -h, --help  show\n  --steps STEPS, --n-steps STEPS\n"
            "                        how many (see --other)\n  --very_long_flag_name VERY_LONG  it\n\n"
            "    python x.py --init out  # an epilog line\n")
    assert help_options(text) == {"--help", "--steps", "--n-steps", "--very_long_flag_name"}


@pytest.mark.slow
def test_printed_commands_pass_only_flags_their_scripts_take(script_flags):
    """Every `python X.py` / `torchrun ... X.py` line in the documents and the docstrings, the real ones included
    (which cannot run here), passes only flags that X.py's --help lists."""
    cmds = [(f"{md}:{ln}", c, w) for md, ln, body, _ in shell_blocks() for c, w in commands(body)]
    cmds += [(f"{rel(f)} (docstring)", c, words_of(c)) for f in SCRIPTS for c in docstring_commands(f)]
    bad, n = [], 0
    for where, c, w in cmds:
        inv = invocation(w)
        if not inv or inv[0] not in script_flags:
            continue
        n += 1
        flags = [a.split("=")[0] for a in inv[1] if a.startswith("--")]
        unknown = [f for f in flags if f not in script_flags[inv[0]]]
        bad += [f"{where}: {inv[0]} takes no {u}: {c}" for u in unknown]
    assert not bad, "\n".join(bad)
    assert n >= 30


def tiny_commands():
    """What test_tiny_commands_run_as_printed runs, in order: the tiny blocks of README.md, then of docs/*.md; then
    the docstrings' tiny lines that those blocks did not already run. -> [(where, shell text)]"""
    runs = [(f"{md}:{ln}", body) for md, ln, body, tiny in shell_blocks() if tiny]
    done = {" ".join(w) for _, body in runs for _, w in commands(body)}
    for f in TINY_DOCSTRINGS:
        for c in docstring_commands(os.path.join(ROOT, f)):
            if "data/shapes" in c and " ".join(words_of(c)) not in done:
                runs.append((f"{f} (docstring)", c))
                done.add(" ".join(words_of(c)))
    return runs


def test_tiny_blocks_are_tiny():
    """A marked block holds no real launch (no torchrun, no real preset, no download), and the README has its chain."""
    runs = tiny_commands()
    assert runs[0][0].startswith("README.md") and "prepare.py" in runs[0][1]
    for where, text in runs:
        assert not re.search(r"torchrun|--preset real|hf download|weights/", text), where


def copy_tree(dst):
    """The working tree without what git ignores for size (the venv, outputs, the shapes world's images)."""
    skip = {".git", ".venv", "out", "runs", "__pycache__", ".pytest_cache", "train", "val"}
    shutil.copytree(ROOT, dst, ignore=lambda d, names: [n for n in names if n in skip and
                                                         (n not in ("train", "val") or d.endswith("shapes"))])


def run_shell(text, cwd, env, timeout=900):
    return subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def shell_env(tmp_path):
    """PATH with `python` = this interpreter; offline; the tests' $UAE_HOME (the tiny preset is built once)."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose the venv
    (b / "python").chmod(0o755)
    return dict(os.environ, PATH=f"{b}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_the_runner_can_fail(tmp_path, shell_env):
    assert run_shell("python -c 'print(1)'\npython no_such_script.py\n", tmp_path, shell_env).returncode != 0
    assert run_shell("python -c 'import sys; sys.exit(2)'\necho never\n", tmp_path, shell_env).stdout == ""


@pytest.mark.slow
def test_tiny_commands_run_as_printed(tmp_path, shell_env, tiny_paths):
    """The marked blocks and the docstrings' tiny lines, as printed, in order, in a copy of the working tree: each
    exits with status 0 and prints no `problem:` and no generate warning (the README's chain, the docs' resume,
    rounds, sample and export lines, a reward of one's own). A few minutes on 2 cores."""
    work = tmp_path / "repo"
    copy_tree(work)
    for where, text in tiny_commands():
        p = run_shell(text, work, shell_env)
        assert p.returncode == 0, f"{where}: status {p.returncode}:\n{text}\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
        # what a reader of these commands once saw on every run: the shapes world's captions.jsonl reported as a
        # bad image by the tiny bench, transformers' warning about min_new_tokens on every generate call
        noise = [w for w in ("problem:", "min_new_tokens") if w in p.stdout + p.stderr]
        assert not noise, f"{where} printed {noise}"
    assert (work / "out" / "bench" / "unified_bench.json").is_file() and (work / "out" / "export_lora").is_dir()
