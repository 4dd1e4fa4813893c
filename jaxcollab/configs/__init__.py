"""The experiment configs that ship with jaxcollab: `semi` and `full`, each with its variants.

`--config=semi:smollm2` names one of them; `--config=path/to/file.py[:variant]` names any config file with a
`get_config(variant)` function. `resolve` turns the first form into the second.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = {"semi": "semi.py", "full": "full.py"}


def resolve(spec: str) -> str:
    """`NAME[:variant]` of a packaged config → `its/file.py[:variant]`; any other spec is returned as is.

    A file of that name in the current directory wins, so an existing `semi` file is not shadowed.
    """
    name, sep, variant = spec.partition(":")
    if name in PACKAGED and not Path(name).exists():
        return str(Path(__file__).with_name(PACKAGED[name])) + sep + variant
    return spec
