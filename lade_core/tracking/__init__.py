"""The MLflow glue, the only modules that import mlflow: runs and metrics logged exactly once (``store``), what a
run stores and how it is read back (``artifacts``), and the logged model format (``model``, with the entry file
MLflow runs, ``pyfunc_entry``)."""
