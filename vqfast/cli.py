"""The vqfast command: vqfast tokenize (images -> VQ codes) and vqfast detokenize (codes -> images).

"vqfast COMMAND --help" tells each one's arguments; "python -m vqfast.tokenize" and "python -m
vqfast.detokenize" are the same commands. Under torchrun: "torchrun --nproc_per_node=N --no-python vqfast
tokenize ..." (the console script) or "torchrun --nproc_per_node=N -m vqfast.tokenize ...".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vqfast import detokenize, tokenize

COMMANDS = {"tokenize": tokenize, "detokenize": detokenize}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(COMMANDS),
                        help="; ".join(f"{name}: {module.SUMMARY}" for name, module in COMMANDS.items()))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's arguments (vqfast COMMAND --help)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return COMMANDS[args.command].main(args.arguments, prog=f"vqfast {args.command}")


if __name__ == "__main__":
    sys.exit(main())
