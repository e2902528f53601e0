"""The registered model's code, logged with MLflow's models-from-code.

MLflow stores this file with the model and runs it on load, so no pickled Python object is
stored in, or loaded from, a published version.
"""

from mlflow.models import set_model

from recsys_pipeline.serving import RecsysPyfunc

set_model(RecsysPyfunc())
