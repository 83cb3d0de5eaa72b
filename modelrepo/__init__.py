"""The model repository: ``models/<name>/<version>/`` folders and their manifests.

Shared by the export stage (which writes it) and the service (which reads it);
it depends on pydantic only.
"""

from .manifest import MANIFEST_FILENAME, PRECISION_FILES, Manifest, load_manifest
from .layout import file_sha256, list_model_names, list_versions

__all__ = [
    "MANIFEST_FILENAME",
    "PRECISION_FILES",
    "Manifest",
    "file_sha256",
    "list_model_names",
    "list_versions",
    "load_manifest",
]
