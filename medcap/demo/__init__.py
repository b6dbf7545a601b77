"""``make demo`` (``pipeline``: evaluate, train, evaluate, report), its mini SLAKE built from
images shipped in packages (``slake``), its report (``report``), and ``make smoke`` (``smoke``)."""
