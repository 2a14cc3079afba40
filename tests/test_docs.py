"""Every reference from the code to a document points inside this repository, to a section that exists;
the README's "Where to read what" table names functions that exist."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/data/shapes/*.py") + glob.glob(f"{ROOT}/tests/*.py"))
REF = re.compile(r"([\w./-]+\.md)((?:,? ?§\d+)*)")


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
                bad.append(f"{os.path.relpath(f, ROOT)}:{ln}: cites SPEC, a document outside the repository")
            for doc, secs in REF.findall(line):
                if not secs and not doc.startswith("docs/"):
                    continue  # an output file such as report.md, not a citation
                path = os.path.join(ROOT, doc)
                if not os.path.isfile(path):
                    bad.append(f"{os.path.relpath(f, ROOT)}:{ln}: {doc} does not exist in the repository")
                    continue
                for n in re.findall(r"§(\d+)", secs):
                    n_refs += 1
                    if int(n) not in sections(path):
                        bad.append(f"{os.path.relpath(f, ROOT)}:{ln}: {doc} has no section §{n}")
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
