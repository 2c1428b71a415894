"""The ``bundle`` stage: the earlier stages' artifacts, the recipe's runtime settings and a
manifest packed into a bundle directory and its reproducible ``.tar`` (the bundle format
itself: :mod:`edgekit.bundle`)."""
