"""OCI images: pulled with skopeo, unpacked with umoci, kept in a local content-addressed store."""

from corral.images.config import resolve_image, resolve_user
from corral.images.store import Image, ImageError, ImageStore, source_of, store_for

__all__ = ["Image", "ImageError", "ImageStore", "resolve_image", "resolve_user", "source_of", "store_for"]
