"""``python -m medcap.demo``: the demo's whole run (``medcap.demo.pipeline``)."""

from medcap.demo.pipeline import main
from medcap.errors import run_main

run_main(main, prog="demo")
