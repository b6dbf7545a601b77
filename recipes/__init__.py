"""Makes ``PYTHONPATH=. tune run recipes/X.py --config recipes/configs/Y.yaml`` (the original
README's form) reach these files: ``tune run`` imports a recipe path as the module
``recipes.X``, and torchtune installs a ``recipes`` package of its own that refuses imports.
With the repository root first on the path, this package is found instead. medcap itself never
imports ``recipes``: ``medcap run`` resolves recipes and configs by file path.
"""
