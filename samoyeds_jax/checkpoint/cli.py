"""The ``samoyeds-convert`` command line (also ``python -m samoyeds_jax.checkpoint``).

absl flags on a private ``FlagValues``, so that ``main`` can run several times in one
process and the demo's global flags never meet these.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from absl import flags

from samoyeds_jax import _cli
from samoyeds_jax.checkpoint.converter import DTYPES, convert

PROG = "samoyeds-convert"
USAGE = (f"usage: {PROG} --input DIR_OR_FILE --output OUT.safetensors --nv N:V "
         f"[--sub_row L] [--calibration FILE] [--top_k K] [--dtype auto|bfloat16|float16] "
         f"[--damp D] [--block B] [--quiet]")
DESCRIPTION = ("Convert a Hugging Face MoE safetensors checkpoint (Mixtral, Qwen2-MoE, "
               "DeepSeek-MoE) to samoyeds_jax's dual-side sparse format (N:V + 2:4).")


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("input", None, "checkpoint directory, index JSON or .safetensors file",
                        flag_values=fv, required=True)
    flags.DEFINE_string("output", None, "output .safetensors file (must not exist)",
                        flag_values=fv, required=True)
    _cli.define_sparsity_flags(fv, nv=None, required=True)
    flags.DEFINE_string("calibration", None,
                        "safetensors/npz with layers.{i}.inputs [n, d_model] for calibrated "
                        "(SparseGPT) pruning; default: magnitude pruning", flag_values=fv)
    _cli.define_top_k_flag("experts per token (default: num_experts_per_tok of config.json)",
                           fv)
    _cli.define_dtype_flag(fv, "auto", DTYPES, "dtype of the sparse values (auto: the "
                           "checkpoint's 16-bit dtype)")
    flags.DEFINE_float("damp", 0.01, "calibration Hessian dampening", flag_values=fv)
    flags.DEFINE_integer("block", None, "calibration column block", flag_values=fv)
    flags.DEFINE_boolean("quiet", False, "no progress bar and no summary", flag_values=fv)
    return fv


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    """``samoyeds-convert`` entry point (argv without the program name; default
    ``sys.argv[1:]``); returns the exit status: 0 done; 2 refused (the input, the output or
    the usage; one line on stderr, nothing written); 1 an internal error (a bug; one line);
    128 + N stopped by signal N (SIGINT, SIGTERM, SIGHUP; nothing written)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = _flags()
    if {"-h", "--help", "-help", "--helpfull"} & set(argv):
        print(f"{USAGE}\n\n{DESCRIPTION}\n\n{fv.get_help(include_special_flags=False)}")
        return 0
    try:
        rest = fv([PROG, *argv])
    except flags.Error as err:
        print(f"{USAGE}\n{PROG}: error: {err}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"{USAGE}\n{PROG}: error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    try:
        convert(fv.input, fv.output, pattern=fv.nv, sub_row=fv.sub_row,
                calibration=fv.calibration, top_k=fv.top_k, dtype=fv.dtype, damp=fv.damp,
                block=fv.block, progress=not fv.quiet, verbose=not fv.quiet)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{PROG}: stopped by {signal.Signals(signum).name}; nothing was written",
              file=sys.stderr)
        return 128 + signum
    except (ValueError, TypeError, OSError) as err:  # ConversionError is a ValueError
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- a bug, still reported in one line
        print(f"{PROG}: internal error: {type(err).__name__}: {_one_line(err)}",
              file=sys.stderr)
        return 1
    return 0
