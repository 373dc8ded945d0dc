"""Running a trained model: batch inference over a dataset (``inference``), ``predict.py``'s prediction on
files or a prepared split (``predict``), and the Ray Serve app (``app``)."""
