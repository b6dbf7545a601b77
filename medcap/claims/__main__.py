"""``python -m medcap.claims``: the seed's first claim, measured (``medcap.claims.pipeline``)."""

from medcap.claims.pipeline import main
from medcap.errors import run_main

run_main(main, prog="claims")
