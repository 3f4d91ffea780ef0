"""The code MLflow logs as the registered model (MLflow's models-from-code): loading a version runs this
file, which names the model class, where a cloudpickled model object would have been unpickled. Whoever can
register a version on a tracking server could have put their own code in a pickle; here the loader runs
omnistream's installed class, and the artifact holds only this file, JSON and safetensors."""

import mlflow.models

from omnistream.serving.pyfunc import OmnistreamModel

mlflow.models.set_model(OmnistreamModel())
