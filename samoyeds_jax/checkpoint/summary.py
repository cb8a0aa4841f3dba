"""The converter's summary: what was converted and how much smaller it got."""

from __future__ import annotations


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def print_summary(s: dict) -> None:
    """Print the summary dict that :func:`~samoyeds_jax.checkpoint.convert` returns."""
    print(f"samoyeds-convert: {s['output']}")
    print(f"  {s['moe_layers']} MoE layers ({s['naming']}), {s['num_experts']} experts, "
          f"d_model={s['d_model']}, d_ff={s['d_ff']}; N:V {s['pattern']} + 2:4, "
          f"sub_row={s['sub_row']}, {s['dtype']}")
    print(f"  experts {_mib(s['expert_bytes_before'])} -> {_mib(s['expert_bytes_after'])} "
          f"({s['expert_bytes_before'] / max(s['expert_bytes_after'], 1):.2f}x smaller); "
          f"file {_mib(s['bytes_before'])} -> {_mib(s['bytes_after'])}; "
          f"{s['tensors_copied']} other tensors copied")
    for i, rep in sorted(s["calibration"].items()):
        print(f"  layer {i}: calibrated on {rep['tokens']} tokens: layer output error "
              f"{rep['layer_error']:.4f} (magnitude {rep['layer_error_magnitude']:.4f}); "
              f"gate/up/down {rep['gate_error']:.4f}/{rep['up_error']:.4f}/"
              f"{rep['down_error']:.4f} (magnitude {rep['gate_error_magnitude']:.4f}/"
              f"{rep['up_error_magnitude']:.4f}/{rep['down_error_magnitude']:.4f})")
    print(f"  {s['seconds']:.1f} s")
