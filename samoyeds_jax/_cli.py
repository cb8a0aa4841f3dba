"""The flags the package's programs share (absl), spelled the same way in the demo,
``samoyeds-convert``, the benchmarks and the scripts: ``--nv``, ``--sub_row``, ``--dtype``
(``bfloat16``, ``float16``), ``--top_k``, ``--preset``. Older spellings stay accepted:
``--pattern``, ``--sub-row``, ``--top-k``, and the dtypes ``bf16``, ``fp16``."""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from samoyeds_jax._util import parse_nv
from samoyeds_jax.format import SUPPORTED_NV, SUPPORTED_SUB_ROWS, SparsityConfig
from samoyeds_jax.presets import PRESETS

FLAGS = flags.FLAGS
DTYPES = ("bfloat16", "float16")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}


def define_sparsity_flags(flag_values: flags.FlagValues = FLAGS, nv: str | None = "1:2",
                          required: bool = False) -> None:
    """``--nv`` (alias ``--pattern``) and ``--sub_row`` (alias ``--sub-row``)."""
    choices = ", ".join(f"{n}:{v}" for n, v in SUPPORTED_NV)
    flags.DEFINE_string("nv", nv, f"N:V pattern of the expert weights ({choices})",
                        flag_values=flag_values, required=required)
    flags.DEFINE_alias("pattern", "nv", flag_values=flag_values)
    define_sub_row_flag(flag_values)


def define_sub_row_flag(flag_values: flags.FlagValues = FLAGS) -> None:
    """``--sub_row`` (alias ``--sub-row``), default 128."""
    flags.DEFINE_integer("sub_row", 128, f"sub-row length L "
                         f"({', '.join(map(str, SUPPORTED_SUB_ROWS))})",
                         flag_values=flag_values)
    flags.DEFINE_alias("sub-row", "sub_row", flag_values=flag_values)


def sparsity_from_flags(flag_values: flags.FlagValues = FLAGS) -> SparsityConfig:
    """The SparsityConfig of ``--nv`` and ``--sub_row`` (app.UsageError if unsupported)."""
    try:
        return SparsityConfig(*parse_nv(flag_values.nv, "--nv"), flag_values.sub_row)
    except ValueError as err:
        raise app.UsageError(str(err)) from None


class _DtypeParser(flags.EnumParser):
    """An enum of dtype names that also takes the short aliases (bf16 -> bfloat16)."""

    def parse(self, argument):
        return super().parse(DTYPE_ALIASES.get(argument, argument))


def define_dtype_flag(flag_values: flags.FlagValues = FLAGS, default: str = "bfloat16",
                      values: Sequence[str] = DTYPES, help: str = "dtype") -> None:
    """``--dtype`` with ``values`` (bf16 and fp16 accepted for their long names)."""
    flags.DEFINE(_DtypeParser(list(values)), "dtype", default,
                 f"{help}: {' | '.join(values)}", flag_values=flag_values)


def define_top_k_flag(help: str, flag_values: flags.FlagValues = FLAGS) -> None:
    """``--top_k`` (alias ``--top-k``), default None."""
    flags.DEFINE_integer("top_k", None, help, flag_values=flag_values)
    flags.DEFINE_alias("top-k", "top_k", flag_values=flag_values)


def define_preset_flag(default: str, extra: Sequence[str] = (), help: str = "model shapes",
                       flag_values: flags.FlagValues = FLAGS) -> None:
    """``--preset``: a name of samoyeds_jax.presets.PRESETS (or one of ``extra``)."""
    flags.DEFINE_enum("preset", default, [*extra, *PRESETS],
                      f"{help} (samoyeds_jax.presets.PRESETS)", flag_values=flag_values)
