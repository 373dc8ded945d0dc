"""The code a logged lade model stores (MLflow models-from-code): it only imports the installed lade_core."""
from mlflow.models import set_model

from lade_core.serving import LadeClassifier

set_model(LadeClassifier())
