"""Similar-case search over an archive: ``medssl embed`` (features of every sample to Parquet),
``medssl search`` (a nearest-neighbour index over them) and ``medssl serve`` (a local web page).

- ``embed.py``: shards or image files -> encoder features, in Parquet parts (resumable);
- ``files.py``: an image file -> encoder input, decoded in a decode worker (torch-free: the worker imports it);
- ``index.py``: the nearest-neighbour index over an embeddings folder, and queries;
- ``thumbnails.py``: a small PNG of an indexed sample, rendered from its shard's pixels;
- ``server.py`` + ``page.html``: the local web page.

Nothing is imported here: the decode worker imports ``medssl.retrieval.files`` and must not pay for torch.
"""
