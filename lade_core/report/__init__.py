"""What a person reads: a stored run evaluated under the shifted protocol and the user's priors (``protocol``), the
comparison tables (``tables``) and the figures (``figures``)."""
