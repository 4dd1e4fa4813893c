"""The packaged `full` config (jaxcollab/configs/full.py: its variants and strategies are described there).

This copy lets a checkout name it by path: `--config=configs/full.py[:variant]`; `--config=full[:variant]` works
from any directory.
"""

from jaxcollab.configs.full import get_config

__all__ = ["get_config"]
