"""Jupyter widgets for LLM Workbench: panels that build core configs, viewers that read runs.

The core (`workbench`) never imports this package. Every panel is a trait class; `dashboard.wire`
is the one place that connects them.
"""

import pandas  # noqa: F401  # imported once here: plotly and a panel's worker thread racing to import it deadlocked

from .compare import RunCompare
from .confusion import ConfusionMatrix
from .auto_number import AutoNumber
from .dashboard import Dashboard, wire
from .data_panel import DataPanel
from .deploy import DeployPanel  # optimise, serve and monitor a trained run
from .entities import EntitiesView  # the entities view (named entities); ConfusionMatrix shows it for such runs
from .ladder import MethodLadder
from .loss_curve import LossCurve
from .method_panel import METHOD_PANELS, MethodPanel, register_method
from .model_picker import ModelPicker
from .playground import Playground
from .regression import RegressionView  # the regression view; ConfusionMatrix shows it for such runs
from .run_summary import RunSummary  # the model beside its classical baseline, the run's choices, its answer
from .chat_playground import ChatPlayground  # conversational runs; streams answers token by token
from .task_chooser import TaskChooser  # the Set up tab's task, from the task table
from .train_panel import TrainPanel
from .trust import TrustView  # robustness and slices of a run, its gaps flagged
from .labelling import LabellingWidget  # active learning: label the suggested texts, train again
from .explain_view import ExplainView  # each word coloured by its push toward a class
from .extend import ExtendRunPanel  # continue a finished run on new data (continual learning), what it forgot

__all__ = [
    "AutoNumber", "ChatPlayground", "ConfusionMatrix", "Dashboard", "DataPanel", "DeployPanel", "EntitiesView", "LossCurve", "METHOD_PANELS", "MethodLadder", "MethodPanel",
    "ModelPicker", "Playground", "RegressionView", "RunCompare", "RunSummary", "TaskChooser", "TrainPanel", "TrustView", "LabellingWidget", "ExplainView",
    "ExtendRunPanel",
    "register_method",
    "wire",
]
