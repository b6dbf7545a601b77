"""``python -m medcap.demo``: the demo's whole run (``medcap.demo.pipeline``)."""

from medcap.demo.pipeline import DemoError, main

try:
    main()
except DemoError as e:
    raise SystemExit(f"demo: {e}") from None
