"""Where a run's numbers go: one interface (``base.RunLogger``), one file per backend (``tensorboard``,
``csv_file``, ``mlflow_run``, ``wandb_run``), the loss / learning-rate curves the run's pictures are drawn
from (``curves``) and the group the trainer writes to, opened from the ``logger`` config group (``group``)."""
