"""A run's configuration: the typed sections, their checks and the flat codec (``schema``)."""
