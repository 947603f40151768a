"""detr-train's configuration: where the Hydra tree lives, its typed schema, and its checks.

Importing this package registers the schema and the resolvers the tree uses; it imports
neither torch nor transformers, so the CLI can compose and check a config in a second.
"""

from detr_train.config.paths import config_dir
from detr_train.config.schema import register_schema

register_schema()

__all__ = ["config_dir"]
