"""The code a logged lade model stores (MLflow models-from-code). It imports lade_core: the copy bundled with the
model (``code/lade_core``, which MLflow puts first on ``sys.path``) in a fresh process, the one already imported in a
process that has one. lade's own loader (``serving.load_classifier``) never runs this file."""
from mlflow.models import set_model

from lade_core.tracking.model import LadeClassifier

set_model(LadeClassifier())
