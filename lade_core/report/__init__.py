"""What a person reads: the comparison tables (``tables``) and the figures (``figures``)."""
