"""The bundle format: the typed manifest and its reader (:mod:`edgekit.bundle.manifest`), safe
unpacking and the file-table check (:mod:`edgekit.bundle.archive`), signatures
(:mod:`edgekit.bundle.signing`). Shared by every reader of a bundle; the stage that writes
one is :mod:`edgekit.pack`."""
