import sys

from medcap.claims.pipeline import main
from medcap.errors import run_main

sys.exit(run_main(main))
