"""The page ``dvc plots show`` writes, drawn without a network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN: offline it shows the PNG plots and nothing
else. ``make setup`` installs the three from their npm packages (``package.json``, into ``node_modules/``)
and writes an HTML template with them inlined; ``dvc plots show --html-template <it>`` (``make plots``, or
plain ``dvc plots show`` once ``make setup`` has set ``plots.html_template`` in ``.dvc/config.local``)
then writes a self-contained page: DVC's templated plots, unchanged, drawn by the local scripts.

    python -m stages.common.offline_plots template      # node_modules/ -> build/plots/offline.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / "node_modules"
TEMPLATE = ROOT / "build" / "plots" / "offline.html"
#: the npm packages' browser builds, in load order (vega-lite and vega-embed use the globals before them)
SCRIPTS = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
#: what DVC's renderer replaces in a template (dvc_render.html.HTML); ``{scripts}`` is left out on purpose:
#: it is where DVC puts its CDN <script> tags
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC plots (offline)</title>
    <!-- {versions}: inlined from node_modules by `python -m stages.common.offline_plots template` -->
{inline_scripts}
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class MissingScripts(FileNotFoundError):
    """node_modules lacks a vega package: ``make setup`` (npm ci) installs them."""


def package_version(node_modules: Path, package: str) -> str:
    return json.loads((node_modules / package / "package.json").read_text())["version"]


def inline_script(path: Path) -> str:
    code = path.read_text(encoding="utf-8")
    for placeholder in PLACEHOLDERS:
        if placeholder in code:  # DVC would replace it inside the script
            raise ValueError(f"{path} contains DVC's template placeholder {placeholder}: cannot be inlined")
    # "</script" inside the code would end the element early; "<\/" is the same text to JavaScript
    code = code.replace("</script", "<\\/script")
    return f"    <script>\n{code}\n    </script>"


def template_html(node_modules: Path = NODE_MODULES) -> str:
    """The template: DVC's placeholders ``{plot_divs}`` and ``{refresh_tag}``, the three scripts inline."""
    missing = [s for s in SCRIPTS if not (node_modules / s).is_file()]
    if missing:
        raise MissingScripts(f"{', '.join(missing)} not under {node_modules}: run `make setup` "
                             "(npm ci installs vega, vega-lite and vega-embed from package.json)")
    versions = ", ".join(f"{s.split('/')[0]} {package_version(node_modules, s.split('/')[0])}" for s in SCRIPTS)
    scripts = "\n".join(inline_script(node_modules / s) for s in SCRIPTS)
    return PAGE.replace("{versions}", versions).replace("{inline_scripts}", scripts)


def write_template(node_modules: Path = NODE_MODULES, out: Path = TEMPLATE) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(template_html(node_modules), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the HTML template for an offline `dvc plots show` page.")
    ap.add_argument("command", choices=["template"])
    ap.add_argument("--node-modules", type=Path, default=NODE_MODULES)
    ap.add_argument("--out", type=Path, default=TEMPLATE)
    args = ap.parse_args(argv)
    try:
        path = write_template(args.node_modules, args.out)
    except MissingScripts as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"offline plots template: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
