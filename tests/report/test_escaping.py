"""Method names from plugins may contain any character: LaTeX, HTML and Markdown must show them literally."""

from __future__ import annotations

import pytest

from petlbench.report import build_report, render, tex_escape
from petlbench.report.rendering import md_escape
from tests.report.factory import HOSTILE, HTML_HOSTILE, TEX_HOSTILE, make_record


@pytest.mark.parametrize(("raw", "tex"), [
    ("my_m&th%d#1", r"my\_m\&th\%d\#1"),
    ("a$b{c}d", r"a\$b\{c\}d"),
    ("~^\\", r"\textasciitilde{}\textasciicircum{}\textbackslash{}"),
    ("<a|b>", r"\textless{}a\textbar{}b\textgreater{}"),
    ("x – y − z ± † ‡", r"x -- y \ensuremath{-} z \ensuremath{\pm} \dag{} \ddag{}"),
    ("café", "café"),
    ("漢", r"\texttt{U+6F22}"),
    ("tab\tnew\nline", "tab new line"),
])
def test_tex_escape(raw, tex):
    assert tex_escape(raw) == tex


def test_tex_escape_leaves_no_special_character_unescaped():
    out = tex_escape(TEX_HOSTILE)
    for i, ch in enumerate(out):
        if ch in "&%$#_":
            assert out[i - 1] == "\\", out
    assert out == r"a\_b\&c\%d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"


def test_hostile_names_in_every_format():
    recs = [make_record(name, "cifar", 0, 50.0 + i) for i, name in enumerate((HOSTILE, TEX_HOSTILE, HTML_HOSTILE))]
    report = build_report(recs, on_warning=lambda m: None)
    tex = render(report, "latex")
    assert r"a\_b\&c\%d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k" in tex
    assert r"x\textless{}script\textgreater{}" in tex
    html = render(report, "html")
    assert "<script>window.__pwned" not in html and "onerror=\"window" not in html
    assert "x&lt;script&gt;window.__pwned=1&lt;/script&gt;&lt;img src=x onerror=&#34;window.__pwned=2&#34;&gt;" in html
    assert html.count("<script") == 1  # only the page's own sorting script
    md = render(report, "markdown")
    assert "| my_m&th%d#1 |" in md
    assert r"| a_b&c%d#e\$f{g}h\~i^j\\k |" in md
    assert r"x\<script\>window.\_\_pwned=1\</script\>" in md


def test_md_escape():
    assert md_escape("a|b") == r"a\|b"
    assert md_escape("vit_base_patch16") == "vit_base_patch16"
    assert md_escape("_x_") == r"\_x\_"
    assert md_escape("&amp; & x") == r"\&amp; & x"
