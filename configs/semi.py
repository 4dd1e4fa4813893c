"""The packaged `semi` config (jaxcollab/configs/semi.py: its variants and strategies are described there).

This copy lets a checkout name it by path: `--config=configs/semi.py[:variant]`; `--config=semi[:variant]` works
from any directory.
"""

from jaxcollab.configs.semi import get_config

__all__ = ["get_config"]
