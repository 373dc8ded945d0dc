"""A run's configuration: the typed sections and their checks (``schema``), the run-time context and the flat
codec at the Ray and MLflow boundaries (``context``), YAML recipes and their composition (``recipes``), and the flags
declared by the losses (``flags``)."""
