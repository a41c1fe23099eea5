"""``python -m training``: the command users know for the headless trainer. The trainer is the
application package above the host (d2f_app), so this entry point runs that program as
``python -m d2f_app`` would, and the engine depends on nothing of the application."""

import runpy

runpy.run_module("d2f_app", run_name="__main__", alter_sys=True)
