"""Markdown tables of the CUDA kernel benchmarks (bench/cuda_kernel.py ``--table``,
bench/cuda_int8.py ``--int8``), printed last in a run."""

from __future__ import annotations


def print_table(rows, name):
    """Markdown tables of native ``name`` against gather, SDPA and the floor (and the
    marginal costs where the rows have them)."""
    print(f"\n{rows[0]['shape']} {rows[0]['dtype']}")
    print(f"| B | ctx | native ({name}) us | gather us | MLX SDPA contig us | floor us "
          "| native/floor | gather/native | native/SDPA |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        n, g, s, f = r[f"{name}_us"], r["gather_us"], r["sdpa_contig_us"], r["floor_us"]
        print(f"| {r['B']} | {r['ctx']} | {n:.1f} | {g:.1f} | {s:.1f} | {f:.1f} | "
              f"{n / f:.2f} | {g / n:.1f} | {n / s:.2f} |")
    if f"{name}_m_us" not in rows[0]:
        return
    print(f"\nmarginal cost per layer (longer chains less the {rows[0]['layers']}-layer one)")
    print(f"| B | ctx | native ({name}) us | MLX SDPA contig us | floor us | native/floor "
          "| native/SDPA |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        n, s, f = r[f"{name}_m_us"], r["sdpa_contig_m_us"], r["floor_us"]
        print(f"| {r['B']} | {r['ctx']} | {n:.1f} | {s:.1f} | {f:.1f} | {n / f:.2f} | "
              f"{n / s:.2f} |")


def print_int8_table(rows: list[dict], extras: tuple[str, ...] = ()) -> None:
    """Markdown: chained and (where measured) marginal per-layer times, the ratio int8 /
    float16 and each dtype's time over its floor; then the int8 forms of ``extras``
    (bench/cuda_int8.py parse_extra) beside the plan's."""
    for kind, suffix in (("chained", "_us"), ("marginal", "_m_us")):
        if rows[0].get(f"int8{suffix}") is None:
            continue
        print(f"\n{rows[0]['shape']}, {kind}, us per layer ({rows[0]['layers']} layers)")
        print("| B | ctx | float16 native | int8 native | int8 / float16 | float16 floor "
              "| int8 floor | float16 / its floor | int8 / its floor |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            f, i = r[f"float16{suffix}"], r[f"int8{suffix}"]
            ff, fi = r["float16_floor_us"], r["int8_floor_us"]
            print(f"| {r['B']} | {r['ctx']} | {f:.1f} | {i:.1f} | {i / f:.2f} | {ff:.1f} | "
                  f"{fi:.1f} | {f / ff:.2f} | {i / fi:.2f} |")
    if not extras or rows[0].get("int8_m_us") is None:
        return
    print("\nint8 forms, marginal us per layer (chained in parentheses); plan = the plan's "
          "chunks, f/s = merge fused/split")
    print("| B | ctx | plan | " + " | ".join(extras) + " |")
    print("|--:|--:|--:|" + "--:|" * len(extras))
    for r in rows:
        cells = [f"{r[f'int8_{n}_m_us']:.1f} ({r[f'int8_{n}_us']:.1f})" for n in extras]
        print(f"| {r['B']} | {r['ctx']} | {r['int8_plan']}: {r['int8_m_us']:.1f} "
              f"({r['int8_us']:.1f}) | " + " | ".join(cells) + " |")
