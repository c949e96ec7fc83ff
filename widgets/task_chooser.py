"""TaskChooser: the Set up tab's task, one button per row of the task table offered on the dashboard.

Each button carries the task's title in full (buttons size to their words and wrap onto new lines at a narrow
width, so nothing is clipped) and the line beneath says what the chosen task's data must hold. The options are
the rows of `workbench.task_table.TASKS` with `in_dashboard`: a task added to the table appears here with no
change to this file.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W
import traitlets as T

from workbench.task_table import DEFAULT_TASK, TASKS, task_spec, tasks_where

from . import _style as S


def dashboard_tasks() -> tuple[str, ...]:
    """The names of the tasks the dashboard sets up, in table order."""
    return tasks_where(in_dashboard=True)


def task_options() -> list[tuple[str, str]]:
    """(title, name) of each task the dashboard sets up: what the chooser offers."""
    return [(TASKS[name].title, name) for name in dashboard_tasks()]


class TaskChooser(W.VBox):
    """The task of the run being set up (`value`: a task name of the table), its title and what it needs."""

    value = T.Unicode(DEFAULT_TASK, help="the chosen task (a row of the task table offered on the dashboard)")
    options = T.Tuple(help="the task names offered, in table order")

    def __init__(self, **kwargs: Any) -> None:
        self._buttons = W.ToggleButtons(options=task_options(), value=self.value, description="Task",
                                        tooltips=[TASKS[name].needs for name in dashboard_tasks()],
                                        style={**S.label_style(), "button_width": "auto"},
                                        layout=W.Layout(width="auto", max_width="100%"))
        self._needs = W.HTML("", layout=S.full_width())
        super().__init__(children=[self._buttons, self._needs], **{"layout": S.full_width(), **kwargs})
        self.options = dashboard_tasks()
        self._buttons.observe(self._on_control, names="value")
        self.observe(self._show, names="value")
        self._show()

    @T.validate("value")
    def _valid_value(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        offered = dashboard_tasks()
        if value not in offered:
            raise T.TraitError(f"task {value!r} is not set up on this page: choose one of {', '.join(offered)}")
        return value

    @property
    def spec(self) -> Any:
        """The chosen task's row (workbench.task_table.TaskSpec)."""
        return task_spec(self.value)

    @property
    def needs_line(self) -> str:
        """What is shown beneath the buttons: the chosen task's title and what its data must hold."""
        return f"{self.spec.title}: {self.spec.needs}"

    def _on_control(self, change: dict[str, Any]) -> None:
        if change["new"] in dashboard_tasks():
            self.value = change["new"]

    def _show(self, change: Any = None) -> None:
        if self._buttons.value != self.value:
            self._buttons.value = self.value
        self._needs.value = S.message(self.needs_line, "muted")
