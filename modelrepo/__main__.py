"""Print the manifest's JSON Schema: ``python -m modelrepo > modelrepo/model.schema.json``."""

import sys

from .manifest import schema_text

sys.stdout.write(schema_text())
