"""The README is the front door and docs/ holds the detail: the README stays short, every relative
link in it and in docs/ reaches a file (and heading) of this repository, and docs/benchmarks.md
quotes bench/results.md as `python -m bench` wrote it, never a hand-edited copy."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")
QUOTE = re.compile(r"<!-- begin quote: bench/results.md -->\n(.*?)<!-- end quote: bench/results.md -->", re.S)


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def pages() -> list[str]:
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    body = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", body, re.M)}


def test_readme_is_short_and_names_only_what_the_repository_has():
    text = read("README.md")
    assert len(text.splitlines()) <= 200, "README.md: over 200 lines; move the detail into docs/"
    for page in pages():
        for outside in ("../shared", "fresh-clone-test", "/work/"):
            assert outside not in read(page), f"{page}: names {outside!r}, which a user of the repository does not have"


def test_every_relative_link_reaches_a_file_and_heading_of_the_repository():
    problems = []
    for page in pages():
        here = os.path.dirname(os.path.join(ROOT, page))
        for target in LINK.findall(read(page)):
            if re.match(r"[a-z]+:", target):
                continue                                      # http(s), mailto
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
            if not full.startswith(ROOT + os.sep) or not os.path.exists(full):
                problems.append(f"{page}: {target}: no such file in the repository")
            elif anchor and full.endswith(".md") and anchor not in anchors(open(full, encoding="utf-8").read()):
                problems.append(f"{page}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_readme_links_every_page_of_docs():
    readme = read("README.md")
    missing = [p for p in pages()[1:] if f"({p})" not in readme]
    assert not missing, f"README.md: no link to {missing}"


def test_benchmarks_page_quotes_bench_results_verbatim():
    m = QUOTE.search(read("docs/benchmarks.md"))
    assert m, "docs/benchmarks.md: no quote of bench/results.md (its begin/end markers are missing)"
    assert m.group(1) == read("bench/results.md"), \
        "docs/benchmarks.md: the quote differs from bench/results.md; quote the file as `python -m bench` wrote it"
