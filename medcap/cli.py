"""``medcap run|ls|cp|validate|serve|estimate``: torchtune's CLI, resolving medcap's recipe and config names.

    medcap run full_finetune_single_device --config llama3/8B_full_single_device key=value ...   (docs/training.md)
    medcap run --nproc_per_node 8 full_finetune_distributed --config llama3/8B_full ...
    medcap run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        full_finetune_distributed --config llama3/8B_full ...                                 (docs/multinode.md)
    medcap run generate --config custom_generation_config test_slake=True ...                   (docs/evaluation.md)
    medcap run probe --config probe labels=... vision_checkpoint=...                            (docs/probing.md)
    medcap serve --config smollm2/135M_demo_generation vision_checkpoint=... port=8000           (docs/serving.md)
    medcap estimate --config llama3/8B_full_single_device gpu=a100-40 dataset_size=9835          (docs/estimate.md)
    medcap ls | medcap cp NAME FILE | medcap validate CONFIG [key=value ...]

Recipes and configs are files under the repository's ``recipes/`` folder, resolved by path:
torchtune installs a top-level ``recipes`` package of its own, so medcap never imports its
recipes as a package. (torchtune's own ``tune run recipes/X.py`` imports the file as the module
``recipes.X``; with the repository root first on the path, ``PYTHONPATH=. tune run ...``, it
finds this repository's ``recipes`` package instead of torchtune's: see ``recipes/__init__.py``.)
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import sys
from pathlib import Path

from medcap.errors import MedcapError, cli_errors, debug_requested
from medcap.recipe_files import (  # noqa: F401 (load_recipe: tests and benches drive recipes through the CLI's name)
    RECIPES,
    list_configs,
    load_recipe,
    recipes_dir,
    resolve_config,
    resolve_recipe,
)


def _run(argv: list[str]) -> None:
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    parser = get_args_parser()
    parser.prog = "medcap run"
    args = parser.parse_args(argv)
    recipe = resolve_recipe(args.training_script)
    recipe_args = list(args.training_script_args)
    if "--config" not in recipe_args:
        raise SystemExit("medcap run: the '--config' argument is required")
    i = recipe_args.index("--config") + 1
    if i >= len(recipe_args):
        raise SystemExit("medcap run: --config needs a name or a file")
    recipe_args[i] = str(resolve_config(recipe_args[i]))
    launcher_flags = argv[: argv.index(args.training_script)]
    if launcher_flags:  # any torchrun flag: launch worker processes
        args.training_script = str(recipe)
        args.training_script_args = recipe_args
        endpoint = _rendezvous(args, launcher_flags)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.rendezvous.api import RendezvousError

        try:
            torchrun(args)
        except ChildFailedError as e:  # each rank printed its own error above
            failed = ", ".join(f"rank {f.local_rank} (exit code {f.exitcode})" for f in e.failures.values())
            raise MedcapError(f"{recipe.name}: {failed} failed; their messages are above") from None
        except RendezvousError as e:
            raise MedcapError(_rendezvous_failure(e, args, endpoint)) from None
        return
    sys.argv = [str(recipe), *recipe_args]
    runpy.run_path(str(recipe), run_name="__main__")


def _rendezvous(args: argparse.Namespace, launcher_flags: list[str]) -> str | None:
    """Where the nodes meet. One node: torchrun's standalone rendezvous on a free port, unless
    an endpoint is named. Several (``--nnodes 2``, ``--nnodes 1:4``): every node must name the
    same endpoint, the first node's address (``--rdzv_endpoint HOST:PORT``, or the static
    rendezvous' ``--master_addr HOST --master_port PORT``); a standalone rendezvous there would
    wait forever for nodes that look for it elsewhere. Returns the endpoint, for messages."""
    from torch.distributed.run import parse_min_max_nnodes

    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    names_master = any(f.split("=")[0] in ("--master_addr", "--master-addr") for f in launcher_flags)
    if args.standalone or max_nodes == 1 and not args.rdzv_endpoint:
        args.standalone = True
        return None
    if not args.rdzv_endpoint and not names_master:
        raise MedcapError(
            f"--nnodes {args.nnodes}: every node must name the same rendezvous, on the first node: "
            "--rdzv_backend c10d --rdzv_endpoint HOST:PORT (see the README's 'More than one machine')"
        )
    return args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"


def _rendezvous_failure(e: BaseException, args: argparse.Namespace, endpoint: str | None) -> str:
    """One line for a rendezvous that failed: which endpoint, after how long, what to check."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    conf = _parse_rendezvous_config(args.rdzv_conf or "")
    where = f"the rendezvous at {endpoint or 'localhost'} ({args.rdzv_backend})"
    if not _while_starting(e):  # the workers had started: another node's launcher went away
        return (
            f"lost {where} after the run had started: another node stopped (its error is in its own output; "
            "this node's messages, if any, are above); this node's workers were stopped"
        )
    if isinstance(e, RendezvousConnectionError):
        read = conf.get("read_timeout", "60")
        return (
            f"cannot reach {where}, gave up after read_timeout={read} s a try: is the first node's "
            "'medcap run' started, is HOST its address as this node sees it, is PORT open between the nodes? "
            "(--rdzv_conf read_timeout=SECONDS)"
        )
    if isinstance(e, RendezvousTimeoutError):
        join = conf.get("join_timeout", "600")
        return (
            f"{where}: not every node joined within join_timeout={join} s (--nnodes {args.nnodes}): "
            "is 'medcap run' started on every node with the same --rdzv_endpoint and --rdzv_id? "
            "(--rdzv_conf join_timeout=SECONDS)"
        )
    return f"{where} failed: {type(e).__name__}: {e}"


def _while_starting(e: BaseException) -> bool:
    """Whether the rendezvous failed while the workers were being started (the nodes never
    met), not later, when torchrun's agent polls the rendezvous of a running job (a node whose
    launcher has exited takes the c10d store with it if it was the first)."""
    tb, names = e.__traceback__, set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "_initialize_workers" in names or "_invoke_run" not in names


def _ls(_: list[str]) -> None:
    print("RECIPE                          FILE")
    for name, fname in RECIPES.items():
        if (recipes_dir() / fname).is_file():
            print(f"{name:32s}recipes/{fname}")
    print("\nCONFIG")
    for name in list_configs():
        print(name)


def _cp(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="medcap cp", description="copy a recipe or config to edit it")
    parser.add_argument("name", help="recipe or config name (see medcap ls)")
    parser.add_argument("destination")
    args = parser.parse_args(argv)
    source = recipes_dir() / RECIPES[args.name] if args.name in RECIPES else resolve_config(args.name)
    dest = Path(args.destination)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise SystemExit(f"{dest} exists: not overwriting")
    shutil.copyfile(source, dest)
    print(f"copied {source} to {dest}")


def _validate(argv: list[str]) -> None:
    """Load a config with overrides; every ``_component_`` (at any depth) must import, and
    torchtune's ``config.validate`` binds each top-level component's arguments to its signature."""
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.config._errors import ConfigError
    from torchtune.config._utils import _get_component_from_path

    if not argv:
        raise SystemExit("medcap validate CONFIG [key=value ...]")
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(argv[0])), OmegaConf.from_dotlist(argv[1:]))
    problems = []

    def walk(node, where):
        if isinstance(node, dict):
            if "_component_" in node:
                try:
                    _get_component_from_path(node["_component_"])
                except Exception as e:  # noqa: BLE001 - report every bad component, not the first
                    problems.append(f"{where}._component_={node['_component_']}: {e}")
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    if not problems:
        try:
            config.validate(cfg)
        except ConfigError as e:
            problems += [str(err) for err in e.errors]
    if problems:
        raise SystemExit("config problems:\n  " + "\n  ".join(problems))
    print(f"{argv[0]}: config is well-formed")


def _serve(argv: list[str]) -> None:
    """``medcap serve --config NAME [key=value ...]``: the model the generate recipe's config names
    behind an OpenAI-compatible chat API and a web page (``medcap.serving``)."""
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from medcap.serving import serve

    argv = list(argv)
    if "--config" in argv[:-1]:
        i = argv.index("--config") + 1
        argv[i] = str(resolve_config(argv[i]))
    parser = TuneRecipeArgumentParser(prog="medcap serve", description=_serve.__doc__)
    serve(_merge_yaml_and_cli_args(*parser.parse_known_args(argv)))


def _estimate(argv: list[str]) -> None:
    """``medcap estimate --config NAME [key=value ...] gpu=NAME``: peak memory, the largest batch
    and step time of a training or generate config on a device, before anything is loaded."""
    from medcap.estimate import run_cli

    run_cli(argv)


COMMANDS = {"run": _run, "ls": _ls, "cp": _cp, "validate": _validate, "serve": _serve, "estimate": _estimate}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug_requested(argv)  # --debug anywhere (or MEDCAP_DEBUG=1): tracebacks for medcap's own errors too
    with cli_errors():
        COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
