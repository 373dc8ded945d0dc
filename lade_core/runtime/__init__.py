"""The process around the work: the local Ray a command starts and its settings (``local_ray``), and the
file locks that make steps idempotent across processes (``locks``)."""
