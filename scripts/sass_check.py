"""Per-kernel SASS summary of a cuobjdump -sass listing (gpu_check.sh's build step).

For every kernel: its sparse MMA count (HMMA.SP / HGMMA.SP), local-memory accesses
(LDL/STL: spills) and, for the Hopper kernel, how many consecutive wgmma pairs ptxas
separated with a full wait (WARPGROUP.DEPBAR.LE gsb0, 0x0): such waits serialize the
wgmmas, and ptxas reports them only as C7519 info lines (docs/kernel_history.md).

  python3 scripts/sass_check.py SASS_FILE
"""
import re

from absl import app

INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
NEAR = 60  # instructions: wgmmas of one k-stage lie closer than this


def summarize(text: str) -> list[str]:
    rows = []
    for chunk in re.split(r"\n\s+Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = [m.group(1) for m in map(INSTR.match, chunk.split("\n")) if m]
        sp = [i for i, s in enumerate(ins) if re.match(r"HG?MMA\.SP", s)]
        wg = [i for i in sp if "HGMMA" in ins[i]]
        serialized = sum(
            1 for a, b in zip(wg, wg[1:])
            if b - a < NEAR and any("DEPBAR.LE gsb0, 0x0" in ins[k] for k in range(a + 1, b)))
        spills = sum(1 for s in ins if re.match(r"(LDL|STL)\b", s))
        if sp:
            short = re.sub(r"^_ZN8samoyeds4cuda\d*", "", name)[:150]
            rows.append(f"  {short} SP-MMA={len(sp)} LDL/STL={spills}"
                        + (f" serialized-wgmma-pairs={serialized}" if wg else ""))
    return rows


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: sass_check.py SASS_FILE")
    with open(argv[1]) as f:
        print("\n".join(summarize(f.read())))


if __name__ == "__main__":
    app.run(main)
