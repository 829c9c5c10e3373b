"""shortcut-ray: shortcut models (one-step diffusion, Frans et al., ICLR 2025) trained on Ray with MLflow.

Importing the package (and its maths modules: model, objectives, sampler, ema, optim, config) does not
import ray or mlflow; those are imported only by the Ray glue (data, worker, launch, tune, tracking).
"""

__version__ = "0.1.0"
