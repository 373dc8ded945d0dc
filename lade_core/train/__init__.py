"""A training run: the driver that starts it (``driver``), the Ray Train worker loop (``loop``), its
checkpoints (``checkpoint``), its life from start to registered model (``runs``), the learning-rate schedules
(``schedules``) and the head fitted on cached backbone features (``features``)."""
