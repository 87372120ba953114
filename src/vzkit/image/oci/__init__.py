"""Container images as VM roots: OCI image layouts, archives and registries.

The pieces, each in one module (imports only downward):

- ``_errors``: the errors of this package (drawn in :mod:`vzkit.errors`);
- ``_ref``: image references in skopeo's transport syntax (``docker://``, bare Docker Hub
  names, ``oci:``, ``oci-archive:``, ``docker-archive:``);
- ``_registry``: the OCI distribution client (HTTP, tokens, credentials, retries, resume);
- ``_manifest``: manifests, indexes and image configs (OCI and Docker schema 2), platform choice;
- ``_sources``: where an image's blobs come from (a layout, an archive, a registry);
- ``_blobs``: the content-addressed blob store in the cache (digest verified before anything
  is kept);
- ``_layers``: a layer's tar applied onto a root tree (whiteouts, links, owners, without root);
- ``_store``: finished OCI images (root disks keyed by config digest) in the cache.
"""
