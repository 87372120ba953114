"""Container images as VM roots: OCI image layouts, archives and registries.

The pieces, each in one module (imports only downward):

- ``_errors``: the errors of this package (drawn in :mod:`vzkit.errors`);
- ``_ref``: image references in skopeo's transport syntax (``docker://``, bare Docker Hub
  names, ``oci:``, ``oci-archive:``, ``docker-archive:``);
- ``_registry``: the OCI distribution client (HTTP, tokens, credentials, retries, resume);
- ``_platform``: OCI platforms (``linux/arm64``) and vzkit's guest arches;
- ``_manifest``: manifests, indexes and image configs (OCI and Docker schema 2), platform choice;
- ``_blobs``: the content-addressed blob store in the cache (digest verified before anything
  is kept);
- ``_sources`` (a layout, a registry) and ``_archives`` (``oci-archive:``,
  ``docker-archive:``, read in place): where an image's blobs come from;
- ``_pull``: a reference's manifest, config and layers into the blob store, for one platform;
- ``_layers``: a layer's tar applied onto a root tree (whiteouts, links, owners, without root);
- ``_store``: finished OCI images (root disks keyed by config digest) in the cache;
- ``_resolve``: ``pull_image`` (pull + convert), ``resolve_oci_image`` (what ``--image REF``
  boots), ``process_defaults`` (the image's env, working directory, user and command).

See ``docs/oci.md``.
"""

from __future__ import annotations

from ._errors import ImageFormatError, PlatformError, RegistryAuthError, RegistryError
from ._platform import Platform, parse_platform
from ._ref import ImageReference, Transport, parse_reference
from ._resolve import process_defaults, pull_image, resolve_oci_image
from ._store import (
    OciImage,
    find_oci_image,
    list_oci_images,
    prune_oci_images,
    remove_oci_image,
)

__all__ = [
    "ImageFormatError",
    "ImageReference",
    "OciImage",
    "Platform",
    "PlatformError",
    "RegistryAuthError",
    "RegistryError",
    "Transport",
    "find_oci_image",
    "list_oci_images",
    "parse_platform",
    "parse_reference",
    "process_defaults",
    "prune_oci_images",
    "pull_image",
    "remove_oci_image",
    "resolve_oci_image",
]
