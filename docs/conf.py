"""Sphinx configuration: the API reference (autodoc + napoleon) and the Markdown guides (MyST).

Built by ``make docs`` into ``docs/_build/html`` with warnings as errors (``-W --keep-going``);
``tests/test_docs.py`` runs the same build.  The version comes from ``deltabkp.__version__``,
the one version source.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The docs describe the tree they sit in, installed or not.
sys.path.insert(0, str(ROOT))

import deltabkp

project = "deltabkp"
author = "the deltabkp authors"
copyright = "the deltabkp authors"
release = deltabkp.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Anchors for the Markdown headings, so guides can link to "formats.md#signature".
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"  # ships with Sphinx: no theme dependency
# Wide enough for the samples' 95-column lines.
html_theme_options = {"page_width": "1180px", "body_max_width": "none"}
html_title = f"deltabkp {release}"


class RepositoryLinks(SphinxPostTransform):
    """A guide's link to a file of the repository outside docs/ (``../examples/systemd/``)
    becomes a link into the source tree beside the build, as on the code host.

    MyST warns about any link it cannot resolve to a document; a link to a path that exists
    in the repository is not broken, one to a path that does not exist still warns.
    """

    default_priority = 8  # before MyST's own resolver (9), which would warn

    def run(self, **kwargs: Any) -> None:
        out_dir = Path(self.app.outdir)
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst" or node.get("refdomain") == "doc":
                continue
            page = DOCS / node.get("refdoc", self.env.docname)
            target = (page.parent / node["reftarget"]).resolve()
            if not (target.is_relative_to(ROOT) and not target.is_relative_to(DOCS)):
                continue
            if not target.exists():
                continue
            html_page = (out_dir / node.get("refdoc", self.env.docname)).parent
            uri = os.path.relpath(target, html_page) + ("/" if target.is_dir() else "")
            ref = nodes.reference("", "", refuri=uri, internal=False)
            ref += node.children
            node.replace_self(ref)


class PublicNames(SphinxDirective):
    """``.. public-names:: MODULE [AS]``: an autodoc entry for every name in ``MODULE.__all__``,
    in that order, documented as ``AS.NAME`` (default ``MODULE.NAME``).

    The reference follows ``__all__`` by construction: a name made public is documented
    without touching the page (tests/test_docs.py checks every name has its entry).  A class
    exported under another name than its own (``deltabkp.rdiff.Signature`` is
    ``RdiffSignature``) gets its entry under its own, private path: autodoc would render the
    public name only as "alias of" it.  Submodules in ``__all__`` have their own section.
    """

    required_arguments = 1
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        module = importlib.import_module(self.arguments[0])
        prefix = self.arguments[1] if len(self.arguments) > 1 else module.__name__
        lines: list[str] = []
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or name.startswith("__"):
                continue
            target = f"{prefix}.{name}"
            if isinstance(obj, type):
                kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
                if obj.__name__ != name:
                    target = f"{obj.__module__}.{obj.__qualname__}"
            elif callable(obj):
                kind = "autofunction"
            else:
                kind = "autodata"
            lines += [f".. {kind}:: {target}", ""]
        self.state_machine.insert_input(lines, self.get_source_info()[0])
        return []


def _drop_object_base(
    app: Sphinx, name: str, obj: object, options: object, bases: list[type]
) -> None:
    """Show bases that say something (an exception's family), not ``Bases: object``."""
    if bases == [object]:
        bases.clear()


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-bases", _drop_object_base)
    app.add_post_transform(RepositoryLinks)
    app.add_directive("public-names", PublicNames)
    return {"parallel_read_safe": True}
